//! Hint files: the keydir entries of one data file, so start-up need not
//! read values.
//!
//! `{id:010}.hint` starts with a 24-byte header (magic, format, and the
//! length of the data file prefix it describes), then one entry per record,
//! in runs sorted by key and then seq:
//! ```text
//! crc32 u32 | seq u64 | hlc u64 | origin u32 | expires_at u64 | flags u8 | key_len u32 | value_len u32 | offset u32 | key
//! ```
//! Hints are advisory: they are written to a temporary name and renamed into
//! place, and any doubt about one (bad CRC, offsets beyond the data file)
//! makes start-up ignore it and scan the data file instead. A hint may cover
//! only a prefix of its data file (the active file after a clean close); the
//! loader scans the rest.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use caskade_common::Version;
use caskade_common::limits::MAX_KEY_BYTES;

use super::datafile::FILE_HEADER_LEN;
use super::record::{FLAG_TOMBSTONE, Header};

const MAGIC: &[u8; 8] = b"CASKHINT";
const FORMAT: u16 = 1;
const HINT_HEADER_LEN: usize = 24;
const ENTRY_FIXED_LEN: usize = 45;

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
    /// Encoded entries of the current run, back to back.
    run: Vec<u8>,
    /// Where each entry of the run starts in `run`.
    starts: Vec<usize>,
}

/// Entries per sorted run (a few MiB of memory for short keys).
const RUN_ENTRIES: usize = 1 << 17;

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
            run: Vec::new(),
            starts: Vec::new(),
        })
    }

    /// Adds the entry of the record at `offset` with `header` and `key`.
    pub fn add(&mut self, offset: u64, header: &Header, key: &[u8]) -> io::Result<()> {
        let mut e = [0u8; ENTRY_FIXED_LEN];
        e[4..12].copy_from_slice(&header.seq.to_le_bytes());
        e[12..20].copy_from_slice(&header.version.hlc.to_le_bytes());
        e[20..24].copy_from_slice(&header.version.origin.to_le_bytes());
        e[24..32].copy_from_slice(&header.expires_at.to_le_bytes());
        e[32] = header.flags;
        e[33..37].copy_from_slice(&header.key_len.to_le_bytes());
        e[37..41].copy_from_slice(&header.value_len.to_le_bytes());
        e[41..45].copy_from_slice(&(offset as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&e[4..]);
        crc.update(key);
        e[..4].copy_from_slice(&crc.finalize().to_le_bytes());
        self.starts.push(self.run.len());
        self.run.extend_from_slice(&e);
        self.run.extend_from_slice(key);
        if self.starts.len() >= RUN_ENTRIES {
            self.write_run()?;
        }
        Ok(())
    }

    /// Writes the current run, sorted.
    fn write_run(&mut self) -> io::Result<()> {
        let run = &self.run;
        let sort_key = |start: usize| {
            let fixed = &run[start..start + ENTRY_FIXED_LEN];
            let key_len = u32::from_le_bytes([fixed[33], fixed[34], fixed[35], fixed[36]]) as usize;
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&fixed[4..12]);
            let key = &run[start + ENTRY_FIXED_LEN..start + ENTRY_FIXED_LEN + key_len];
            (key, u64::from_le_bytes(seq))
        };
        self.starts
            .sort_unstable_by(|&a, &b| sort_key(a).cmp(&sort_key(b)));
        for &start in &self.starts {
            let (key, _) = sort_key(start);
            self.out
                .write_all(&run[start..start + ENTRY_FIXED_LEN + key.len()])?;
        }
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
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(HintProblem::Missing),
        Err(e) => return Err(HintProblem::Io(e)),
    };
    let mut input = BufReader::with_capacity(256 << 10, file);
    let mut header = [0u8; HINT_HEADER_LEN];
    read_exact_or(&mut input, &mut header, "hint header truncated")?;
    if &header[..8] != MAGIC || header[8..10] != FORMAT.to_le_bytes() {
        return Err(HintProblem::Invalid("bad hint header"));
    }
    let covered = u64::from_le_bytes(
        header[16..24]
            .try_into()
            .map_err(|_| HintProblem::Invalid("bad hint header"))?,
    );
    if covered < FILE_HEADER_LEN || covered > data_len {
        return Err(HintProblem::Invalid("hint covers more than the data file"));
    }
    let mut key = Vec::with_capacity(MAX_KEY_BYTES);
    let mut fixed = [0u8; ENTRY_FIXED_LEN];
    loop {
        match input.read_exact(&mut fixed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(HintProblem::Io(e)),
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&fixed[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        let header = Header {
            seq: u64_at(4),
            version: Version::new(u64_at(12), u32_at(20)),
            expires_at: u64_at(24),
            flags: fixed[32],
            key_len: u32_at(33),
            value_len: u32_at(37),
        };
        let offset = u32_at(41);
        if header.key_len == 0
            || header.key_len as usize > MAX_KEY_BYTES
            || header.flags & !FLAG_TOMBSTONE != 0
        {
            return Err(HintProblem::Invalid("bad hint entry"));
        }
        key.resize(header.key_len as usize, 0);
        read_exact_or(&mut input, &mut key, "hint entry truncated")?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fixed[4..]);
        crc.update(&key);
        if crc.finalize() != u32_at(0) {
            return Err(HintProblem::Invalid("hint entry checksum mismatch"));
        }
        if u64::from(offset) < FILE_HEADER_LEN
            || u64::from(offset) + header.record_len() as u64 > covered
        {
            return Err(HintProblem::Invalid(
                "hint entry points outside the data file",
            ));
        }
        each(HintEntry { header, offset }, &key);
    }
    Ok(covered)
}

fn read_exact_or(
    input: &mut impl Read,
    buf: &mut [u8],
    why: &'static str,
) -> Result<(), HintProblem> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => HintProblem::Invalid(why),
        _ => HintProblem::Io(e),
    })
}

/// Moves a finished hint from `tmp` to `path`.
pub fn install(tmp: &Path, path: &Path) -> io::Result<()> {
    fs::rename(tmp, path)
}
