//! Hint files: the keydir entries of one data file, so start-up need not
//! read values.
//!
//! `{id:010}.hint` starts with a 24-byte header (magic, format, the CRC of
//! everything after the header, and the length of the data file prefix it
//! describes), then one entry per record, in runs sorted by key and then seq:
//! ```text
//! seq u64 | hlc u64 | origin u32 | expires_at u64 | flags u8 | key_len u32 | value_len u32 | offset u32 | key
//! ```
//! Hints are advisory: they are written to a temporary name and renamed into
//! place, and any doubt about one (bad CRC, offsets beyond the data file)
//! makes start-up ignore it and scan the data file instead. A hint may cover
//! only a prefix of its data file (the active file after a clean close); the
//! loader scans the rest. One CRC over the whole body, checked in one pass,
//! costs start-up far less than a CRC per entry.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use caskade_common::Version;
use caskade_common::limits::MAX_KEY_BYTES;

use super::datafile::FILE_HEADER_LEN;
use super::record::{FLAG_TOMBSTONE, Header, u32_at, u64_at};

const MAGIC: &[u8; 8] = b"CASKHINT";
const FORMAT: u16 = 1;
const HINT_HEADER_LEN: usize = 24;
const ENTRY_FIXED_LEN: usize = 41;

/// One hint entry: a record's header and where it is.
#[derive(Debug, Clone, Copy)]
pub struct HintEntry {
    /// The record's header fields.
    pub header: Header,
    /// Offset of the record in the data file.
    pub offset: u32,
}

/// Builds a hint file under a temporary name. Entries are written in
/// sorted runs of up to [`RUN_ENTRIES`] (by key, then seq), so that start-up
/// merges a few long runs instead of sorting every key, while the writer
/// holds at most one run in memory.
#[derive(Debug)]
pub struct HintWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    body_crc: crc32fast::Hasher,
    /// Encoded entries of the current run, back to back.
    run: Vec<u8>,
    /// Where each entry of the run starts in `run`.
    starts: Vec<usize>,
    /// The run in sorted order, as written.
    sorted: Vec<u8>,
}

/// Entries per sorted run: about 30 MiB of memory for short keys, and few
/// enough runs per file that start-up merges them in one or two passes.
const RUN_ENTRIES: usize = 1 << 19;

impl HintWriter {
    /// Starts a hint at temporary path `tmp`.
    pub fn create(tmp: PathBuf) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut out = BufWriter::with_capacity(256 << 10, file);
        out.write_all(&[0u8; HINT_HEADER_LEN])?;
        Ok(HintWriter {
            out,
            tmp,
            body_crc: crc32fast::Hasher::new(),
            run: Vec::new(),
            starts: Vec::new(),
            sorted: Vec::new(),
        })
    }

    /// Adds the entry of the record at `offset` with `header` and `key`.
    pub fn add(&mut self, offset: u64, header: &Header, key: &[u8]) -> io::Result<()> {
        self.starts.push(self.run.len());
        let e = &mut self.run;
        e.extend_from_slice(&header.seq.to_le_bytes());
        e.extend_from_slice(&header.version.hlc.to_le_bytes());
        e.extend_from_slice(&header.version.origin.to_le_bytes());
        e.extend_from_slice(&header.expires_at.to_le_bytes());
        e.push(header.flags);
        e.extend_from_slice(&header.key_len.to_le_bytes());
        e.extend_from_slice(&header.value_len.to_le_bytes());
        e.extend_from_slice(&(offset as u32).to_le_bytes());
        e.extend_from_slice(key);
        if self.starts.len() >= RUN_ENTRIES {
            self.write_run()?;
        }
        Ok(())
    }

    /// Writes the current run, sorted.
    fn write_run(&mut self) -> io::Result<()> {
        let run = &self.run;
        let sort_key = |start: usize| {
            let key_len = u32_at(run, start + 29) as usize;
            let key = &run[start + ENTRY_FIXED_LEN..start + ENTRY_FIXED_LEN + key_len];
            (key, u64_at(run, start))
        };
        self.starts
            .sort_unstable_by(|&a, &b| sort_key(a).cmp(&sort_key(b)));
        self.sorted.clear();
        for &start in &self.starts {
            let (key, _) = sort_key(start);
            self.sorted
                .extend_from_slice(&run[start..start + ENTRY_FIXED_LEN + key.len()]);
        }
        self.body_crc.update(&self.sorted);
        self.out.write_all(&self.sorted)?;
        self.run.clear();
        self.starts.clear();
        Ok(())
    }

    /// Writes the header (covering `data_len` bytes of the data file),
    /// syncs, and returns the file still under its temporary name.
    pub fn finish(mut self, data_len: u64) -> io::Result<PathBuf> {
        self.write_run()?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        let mut header = [0u8; HINT_HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..10].copy_from_slice(&FORMAT.to_le_bytes());
        header[12..16].copy_from_slice(&self.body_crc.finalize().to_le_bytes());
        header[16..24].copy_from_slice(&data_len.to_le_bytes());
        file.write_all_at(&header, 0)?;
        file.sync_all()?;
        Ok(self.tmp)
    }
}

/// Why a hint file was not used.
#[derive(Debug)]
pub enum HintProblem {
    /// There is none.
    Missing,
    /// It exists but cannot be trusted.
    Invalid(&'static str),
    /// Reading it failed.
    Io(io::Error),
}

/// Reads the hint at `path` for a data file of `data_len` bytes, calling
/// `each(entry, key)` per entry, and returns the data length it covers.
/// On an error the caller must discard the entries already handed out.
pub fn load(
    path: &Path,
    data_len: u64,
    mut each: impl FnMut(HintEntry, &[u8]),
) -> Result<u64, HintProblem> {
    let raw = match fs::read(path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(HintProblem::Missing),
        Err(e) => return Err(HintProblem::Io(e)),
    };
    if raw.len() < HINT_HEADER_LEN || &raw[..8] != MAGIC || raw[8..10] != FORMAT.to_le_bytes() {
        return Err(HintProblem::Invalid("bad hint header"));
    }
    let body = &raw[HINT_HEADER_LEN..];
    if crc32fast::hash(body) != u32_at(&raw, 12) {
        return Err(HintProblem::Invalid("hint checksum mismatch"));
    }
    let covered = u64_at(&raw, 16);
    if covered < FILE_HEADER_LEN || covered > data_len {
        return Err(HintProblem::Invalid("hint covers more than the data file"));
    }
    let mut at = 0;
    while at < body.len() {
        let Some(fixed) = body.get(at..at + ENTRY_FIXED_LEN) else {
            return Err(HintProblem::Invalid("hint entry truncated"));
        };
        let header = Header {
            seq: u64_at(fixed, 0),
            version: Version::new(u64_at(fixed, 8), u32_at(fixed, 16)),
            expires_at: u64_at(fixed, 20),
            flags: fixed[28],
            key_len: u32_at(fixed, 29),
            value_len: u32_at(fixed, 33),
        };
        let offset = u32_at(fixed, 37);
        if header.key_len == 0
            || header.key_len as usize > MAX_KEY_BYTES
            || header.flags & !FLAG_TOMBSTONE != 0
        {
            return Err(HintProblem::Invalid("bad hint entry"));
        }
        let key_start = at + ENTRY_FIXED_LEN;
        let Some(key) = body.get(key_start..key_start + header.key_len as usize) else {
            return Err(HintProblem::Invalid("hint entry truncated"));
        };
        if u64::from(offset) < FILE_HEADER_LEN
            || u64::from(offset) + header.record_len() as u64 > covered
        {
            return Err(HintProblem::Invalid(
                "hint entry points outside the data file",
            ));
        }
        each(HintEntry { header, offset }, key);
        at = key_start + key.len();
    }
    Ok(covered)
}

/// Moves a finished hint from `tmp` to `path`.
pub fn install(tmp: &Path, path: &Path) -> io::Result<()> {
    fs::rename(tmp, path)
}
