//! A small disk for the tests that fill one: a tmpfs of a chosen size on a
//! temporary directory, and a ballast file that takes its space and gives
//! it back on demand.
//!
//! Mounting needs root. Where it is missing the test is skipped with the
//! reason printed, except in CI (`CI` set), where it fails: CI runs as root,
//! and a full-disk test that silently skipped there would prove nothing.
//! The mount is detached when the [`SmallDisk`] drops, also when a test
//! panics.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};
use tempfile::TempDir;

/// A tmpfs of a fixed size, mounted for the life of this value.
#[derive(Debug)]
pub struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` on a new temporary directory, or says why
    /// it cannot and returns `None` (outside CI only).
    pub fn mount(bytes: u64) -> Option<SmallDisk> {
        let refuse = |why: String| {
            if std::env::var_os("CI").is_some() {
                panic!("a full-disk test cannot run in CI: {why}");
            }
            eprintln!("skipped: {why}");
            None
        };
        if !rustix::process::geteuid().is_root() {
            return refuse("mounting a small tmpfs needs root".into());
        }
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(error) => return refuse(format!("no temporary directory: {error}")),
        };
        let options = std::ffi::CString::new(format!("size={bytes},mode=0700"))
            .expect("mount options have no NUL");
        if let Err(error) = mount(
            "caskade-test",
            dir.path(),
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            options.as_c_str(),
        ) {
            return refuse(format!("cannot mount a tmpfs: {error}"));
        }
        Some(SmallDisk { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the ballast lives (a file directly on the tmpfs).
    fn ballast_path(&self) -> PathBuf {
        self.path().join("ballast")
    }

    /// Bytes free for an unprivileged writer.
    pub fn available(&self) -> io::Result<u64> {
        let stat = rustix::fs::statvfs(self.path())?;
        Ok(stat.f_bavail * stat.f_frsize)
    }

    /// Grows the ballast until at most `leave` bytes are free (to the page).
    pub fn fill_leaving(&self, leave: u64) -> io::Result<()> {
        let mut ballast = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.ballast_path())?;
        let chunk = vec![0xA5u8; 4096];
        while self.available()? > leave {
            match ballast.write(&chunk) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::StorageFull => break,
                Err(error) => return Err(error),
            }
        }
        ballast.sync_all()
    }

    /// Deletes the ballast, freeing its space.
    pub fn free_ballast(&self) -> io::Result<()> {
        match fs::remove_file(self.ballast_path()) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Fills what is left completely with a second ballast file, and
    /// returns its path (delete it to free that space again).
    pub fn fill_up(&self) -> io::Result<PathBuf> {
        let path = self.path().join("ballast-rest");
        let mut file = File::create(&path)?;
        let chunk = vec![0x5Au8; 4096];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::StorageFull => break,
                Err(error) => return Err(error),
            }
        }
        Ok(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Detached, so that a file still open (a node not yet stopped by a
        // failing test) cannot keep the mount alive; the temporary
        // directory is removed after.
        if let Err(error) = unmount(self.dir.path(), UnmountFlags::DETACH) {
            eprintln!("unmounting {}: {error}", self.dir.path().display());
        }
    }
}
