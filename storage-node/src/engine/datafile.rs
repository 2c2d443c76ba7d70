//! One data file: its header, positional reads, appends, and a buffered
//! sequential reader that yields verified records.
//!
//! A data file is `{id:010}.data`: a 16-byte header (magic, format, kind)
//! followed by records. Only the engine's single writer appends, and only to
//! the active file; every other file is immutable. Readers use positional
//! reads (`pread`), so any number of them share one file descriptor without
//! locking. Once a file is immutable it is also memory-mapped, and point
//! reads copy from the mapping instead of making a system call: on a store
//! whose data is in the page cache the `pread` was most of a `get`. A
//! merged-away file is unlinked while readers may still hold its
//! `Arc<DataFile>`: on POSIX the open descriptor and the mapping keep its
//! bytes readable until the last reader drops it.

use std::borrow::Borrow;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Advice, Mmap};

use super::record::{self, BadRecord, HEADER_LEN, Header};

/// Bytes of the file header.
pub const FILE_HEADER_LEN: u64 = 16;
const MAGIC: &[u8; 8] = b"CASKADE\0";
const FORMAT: u16 = 1;

/// How a data file came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Written by the engine's writer, in write order; the newest one is active.
    Log,
    /// Written by merge; immutable from birth.
    Merged,
}

/// The path of data file `id` in `dir`.
pub fn data_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.data"))
}

/// The path of the hint file of data file `id` in `dir`.
pub fn hint_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.hint"))
}

/// The file id named by a `{id:010}.data` file name.
pub fn parse_data_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".data")?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// An open data file.
#[derive(Debug)]
pub struct DataFile {
    /// File id: the number in its name.
    pub id: u32,
    /// Where it lives.
    pub path: PathBuf,
    file: File,
    /// The whole file, mapped once it is immutable.
    map: OnceLock<Mmap>,
    /// Bytes in the file that hold complete records (plus the header). For
    /// the active file this grows after each append completes.
    len: AtomicU64,
    /// Bytes of records no longer pointed to by the keydir.
    dead_bytes: AtomicU64,
    /// Smallest and largest record sequence numbers in the file
    /// (`u64::MAX` / 0 while it is empty).
    min_seq: AtomicU64,
    max_seq: AtomicU64,
}

/// The header of a file, or why there is none.
pub enum HeaderState {
    /// A valid header.
    Valid(FileKind),
    /// Shorter than a header: a file whose creation a crash interrupted.
    Torn,
}

impl DataFile {
    /// Creates file `path` with a header (not yet synced).
    pub fn create(path: PathBuf, id: u32, kind: FileKind) -> io::Result<DataFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all_at(&header_bytes(kind), 0)?;
        Ok(Self::from_parts(id, path, file, FILE_HEADER_LEN))
    }

    /// Opens an existing data file for reading and appending.
    pub fn open(path: PathBuf, id: u32) -> io::Result<(DataFile, HeaderState)> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = file.metadata()?.len();
        if len < FILE_HEADER_LEN {
            let data = Self::from_parts(id, path, file, len);
            return Ok((data, HeaderState::Torn));
        }
        let mut raw = [0u8; FILE_HEADER_LEN as usize];
        file.read_exact_at(&mut raw, 0)?;
        let kind = parse_header(&raw).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "not a caskade data file header")
        })?;
        Ok((
            Self::from_parts(id, path, file, len),
            HeaderState::Valid(kind),
        ))
    }

    fn from_parts(id: u32, path: PathBuf, file: File, len: u64) -> DataFile {
        DataFile {
            id,
            path,
            file,
            map: OnceLock::new(),
            len: AtomicU64::new(len),
            dead_bytes: AtomicU64::new(0),
            min_seq: AtomicU64::new(u64::MAX),
            max_seq: AtomicU64::new(0),
        }
    }

    /// Rewrites the header of a torn file and drops anything after it.
    pub fn reset_torn(&self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.write_all_at(&header_bytes(FileKind::Log), 0)?;
        self.len.store(FILE_HEADER_LEN, Ordering::Release);
        Ok(())
    }

    /// Bytes of complete records plus the header.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// True if the file holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() <= FILE_HEADER_LEN
    }

    /// Appends `bytes` at the current end. Single writer only.
    pub fn append(&self, bytes: &[u8]) -> io::Result<u64> {
        let offset = self.len();
        self.file.write_all_at(bytes, offset)?;
        self.len
            .store(offset + bytes.len() as u64, Ordering::Release);
        Ok(offset)
    }

    /// Drops whatever a failed append left past the last complete record
    /// (a short write on a full disk), giving its space back. Not synced:
    /// the caller fsyncs the file, or complete records among those bytes
    /// could come back after a power loss.
    pub fn discard_partial_append(&self) -> io::Result<()> {
        self.file.set_len(self.len())
    }

    /// Cuts the file at `len` (recovery of a torn tail).
    pub fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    /// Copies `len` bytes at `offset` out of the mapping, or `None` if the
    /// file is not mapped (not sealed yet, or mapping failed).
    pub fn read_mapped(&self, offset: u64, len: usize) -> Option<io::Result<Vec<u8>>> {
        let map = self.map.get()?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        Some(
            map.get(start..start.saturating_add(len))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof)),
        )
    }

    /// Reads `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if let Some(read) = self.read_mapped(offset, len) {
            return read;
        }
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Declares the file immutable: it is never written or truncated again,
    /// so reads may go through a memory mapping from now on.
    /// A file that cannot be mapped keeps being read with `pread`.
    pub fn seal(&self) {
        if self.map.get().is_some() || self.len() <= FILE_HEADER_LEN {
            return;
        }
        let mapped = map_immutable(&self.file).and_then(|map| {
            // Point reads: readahead around a record would mostly read waste.
            map.advise(Advice::Random)?;
            Ok(map)
        });
        match mapped {
            Ok(map) => {
                let _ = self.map.set(map);
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot map data file; reading it with pread")
            }
        }
    }

    /// fdatasync: the appended bytes and the file length are durable.
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Records that a record with `seq` lives here.
    pub fn note_seq(&self, seq: u64) {
        self.min_seq.fetch_min(seq, Ordering::AcqRel);
        self.max_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// Smallest record seq in the file (`u64::MAX` when empty).
    pub fn min_seq(&self) -> u64 {
        self.min_seq.load(Ordering::Acquire)
    }

    /// Largest record seq in the file (0 when empty).
    pub fn max_seq(&self) -> u64 {
        self.max_seq.load(Ordering::Acquire)
    }

    /// Adds `bytes` to the file's dead bytes.
    pub fn add_dead(&self, bytes: u64) {
        self.dead_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Bytes of superseded records.
    pub fn dead_bytes(&self) -> u64 {
        self.dead_bytes.load(Ordering::Acquire)
    }

    /// Bytes of records (the file minus its header).
    pub fn record_bytes(&self) -> u64 {
        self.len().saturating_sub(FILE_HEADER_LEN)
    }
}

/// Maps an immutable data file.
///
/// The one `unsafe` block of caskade, kept because it was measured: with
/// the data in the page cache, a `get` through a mapping runs about twice
/// as fast as one through `pread` (see the README's benchmark section).
#[allow(unsafe_code)]
fn map_immutable(file: &File) -> io::Result<Mmap> {
    // SAFETY: a mapping is sound as long as nobody truncates or rewrites the
    // file while it is mapped. caskade only maps sealed files: it never
    // writes to them again, never truncates them (only the active file is
    // ever truncated, at open, before anything maps it), and merge unlinks
    // them rather than rewriting them, which leaves the mapping valid. The
    // directory's `LOCK` keeps other caskade processes out; changing a data
    // directory's files behind a running engine is outside its contract,
    // as with any database.
    unsafe { Mmap::map(file) }
}

fn header_bytes(kind: FileKind) -> [u8; FILE_HEADER_LEN as usize] {
    let mut raw = [0u8; FILE_HEADER_LEN as usize];
    raw[..8].copy_from_slice(MAGIC);
    raw[8..10].copy_from_slice(&FORMAT.to_le_bytes());
    raw[10] = match kind {
        FileKind::Log => 0,
        FileKind::Merged => 1,
    };
    raw
}

fn parse_header(raw: &[u8; FILE_HEADER_LEN as usize]) -> Option<FileKind> {
    if &raw[..8] != MAGIC || raw[8..10] != FORMAT.to_le_bytes() {
        return None;
    }
    match raw[10] {
        0 => Some(FileKind::Log),
        1 => Some(FileKind::Merged),
        _ => None,
    }
}

/// A record found by [`RecordReader`]; its bytes stay valid until the
/// reader moves on.
#[derive(Debug, Clone, Copy)]
pub struct Found {
    /// Offset of the record in the file.
    pub offset: u64,
    /// Its parsed header.
    pub header: Header,
    start: usize,
}

/// Reads verified records in file order through a large buffer. `F` is
/// `&DataFile` or `Arc<DataFile>` (for readers that outlive a borrow).
#[derive(Debug)]
pub struct RecordReader<F> {
    file: F,
    /// File offset of `buf[0]`.
    buf_pos: u64,
    buf: Vec<u8>,
    /// Next unread byte in `buf`.
    cursor: usize,
    /// Read no further than this file offset.
    limit: u64,
}

const READ_CHUNK: usize = 256 << 10;

impl<F: Borrow<DataFile>> RecordReader<F> {
    /// A reader of `file` from `from` up to `limit`.
    pub fn new(file: F, from: u64, limit: u64) -> Self {
        RecordReader {
            file,
            buf_pos: from,
            buf: Vec::new(),
            cursor: 0,
            limit,
        }
    }

    /// The file being read.
    pub fn file(&self) -> &DataFile {
        self.file.borrow()
    }

    /// Offset of the next record to be read.
    pub fn position(&self) -> u64 {
        self.buf_pos + self.cursor as u64
    }

    /// Continues reading at `offset`, keeping buffered bytes when it can.
    pub fn seek(&mut self, offset: u64) {
        let buffered = self.buf_pos..self.buf_pos + self.buf.len() as u64;
        if buffered.contains(&offset) {
            self.cursor = (offset - self.buf_pos) as usize;
        } else {
            self.buf_pos = offset;
            self.buf.clear();
            self.cursor = 0;
        }
    }

    /// Makes at least `want` unread bytes available, or all that remain
    /// before `limit`; returns how many are available.
    fn fill(&mut self, want: usize) -> io::Result<usize> {
        let available = self.buf.len() - self.cursor;
        if available >= want {
            return Ok(available);
        }
        self.buf.drain(..self.cursor);
        self.buf_pos += self.cursor as u64;
        self.cursor = 0;
        let file_pos = self.buf_pos + self.buf.len() as u64;
        let remaining = self.limit.saturating_sub(file_pos);
        // Read in large chunks; `want` > buf.len() here, so this is positive.
        let wanted = want.max(READ_CHUNK) - self.buf.len();
        let to_read = (wanted as u64).min(remaining) as usize;
        if to_read > 0 {
            let start = self.buf.len();
            self.buf.resize(start + to_read, 0);
            self.file
                .borrow()
                .file
                .read_exact_at(&mut self.buf[start..], file_pos)?;
        }
        Ok(self.buf.len())
    }

    /// The next verified record, `Ok(None)` at the limit, or the offset of
    /// bytes that are not a valid record.
    pub fn next_record(&mut self) -> io::Result<Result<Option<Found>, (u64, BadRecord)>> {
        let offset = self.position();
        if offset >= self.limit {
            return Ok(Ok(None));
        }
        let available = self.fill(HEADER_LEN)?;
        let header = match record::parse_header(&self.buf[self.cursor..self.cursor + available]) {
            Ok(h) => h,
            Err(bad) => return Ok(Err((offset, bad))),
        };
        let len = header.record_len();
        if self.fill(len)? < len {
            return Ok(Err((offset, BadRecord::Truncated)));
        }
        let start = self.cursor;
        if let Err(bad) = record::verify(&self.buf[start..start + len]) {
            return Ok(Err((offset, bad)));
        }
        self.cursor += len;
        Ok(Ok(Some(Found {
            offset,
            header,
            start,
        })))
    }

    /// The bytes of a record just returned by `next_record`.
    pub fn bytes(&self, found: &Found) -> &[u8] {
        &self.buf[found.start..found.start + found.header.record_len()]
    }

    /// After damage at `bad_offset`, moves to the next offset at which a
    /// valid record starts (or to the limit). Returns that offset.
    pub fn resync_after(&mut self, bad_offset: u64) -> io::Result<u64> {
        let mut candidate = bad_offset + 1;
        while candidate < self.limit {
            self.seek(candidate);
            if let Ok(Some(_)) = self.next_record()? {
                self.seek(candidate);
                return Ok(candidate);
            }
            candidate += 1;
        }
        self.seek(self.limit);
        Ok(self.limit)
    }
}
