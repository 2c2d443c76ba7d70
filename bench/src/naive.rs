//! The naive baseline store caskade's write path is measured against: an
//! append-only file of `crc | key_len | value_len | key | value` records and
//! a `HashMap` from key to `(offset, length)`. No versions, no rotation, no
//! recovery, no fsync: the least work a log-structured put can do.
//!
//! Two flush modes, because they promise different things:
//! [`Flush::PerPut`] hands every record to the OS with one `write_all`
//! (a process crash loses nothing, as with caskade's `never` durability);
//! [`Flush::Buffered`] goes through a `BufWriter` and loses the buffered tail
//! if the process dies. This is benchmark code, not a store: it never recovers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, bail};

/// `crc32 (4) | key_len u16 (2) | value_len u32 (4)`.
const HEADER_LEN: usize = 10;

/// When records are handed to the OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// One `write_all` syscall per put.
    PerPut,
    /// Through a 64 KiB `BufWriter`.
    Buffered,
}

#[derive(Debug)]
enum Sink {
    Direct(File),
    Buffered(BufWriter<File>),
}

/// The baseline store.
#[derive(Debug)]
pub struct NaiveLog {
    sink: Sink,
    /// A second handle for positional reads.
    reader: File,
    index: HashMap<Vec<u8>, (u64, u32)>,
    end: u64,
    /// Reused for encoding so a put allocates only the index's key copy.
    record: Vec<u8>,
}

impl NaiveLog {
    /// Creates a new, empty log file at `path`.
    pub fn create(path: &Path, flush: Flush) -> anyhow::Result<Self> {
        let file = File::options()
            .read(true)
            .append(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let reader = file.try_clone().context("cloning the log handle")?;
        let sink = match flush {
            Flush::PerPut => Sink::Direct(file),
            Flush::Buffered => Sink::Buffered(BufWriter::with_capacity(64 << 10, file)),
        };
        Ok(NaiveLog {
            sink,
            reader,
            index: HashMap::new(),
            end: 0,
            record: Vec::with_capacity(HEADER_LEN + 1024),
        })
    }

    /// Appends a record and points the index at it.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        let key_len = u16::try_from(key.len()).context("key longer than 64 KiB")?;
        let value_len = u32::try_from(value.len()).context("value longer than 4 GiB")?;
        self.record.clear();
        self.record.extend_from_slice(&[0; 4]);
        self.record.extend_from_slice(&key_len.to_le_bytes());
        self.record.extend_from_slice(&value_len.to_le_bytes());
        self.record.extend_from_slice(key);
        self.record.extend_from_slice(value);
        let crc = crc32fast::hash(&self.record[4..]);
        self.record[..4].copy_from_slice(&crc.to_le_bytes());
        match &mut self.sink {
            Sink::Direct(file) => file.write_all(&self.record)?,
            Sink::Buffered(buf) => buf.write_all(&self.record)?,
        }
        let len = self.record.len() as u32;
        self.index.insert(key.to_vec(), (self.end, len));
        self.end += u64::from(len);
        Ok(())
    }

    /// Hands any buffered records to the OS.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if let Sink::Buffered(buf) = &mut self.sink {
            buf.flush()?;
        }
        Ok(())
    }

    /// Reads a key's value with one positional read, checking the crc.
    pub fn get(&self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(&(offset, len)) = self.index.get(key) else {
            return Ok(None);
        };
        let mut record = vec![0; len as usize];
        self.reader.read_exact_at(&mut record, offset)?;
        let crc = u32::from_le_bytes(record[..4].try_into().expect("4-byte slice"));
        if crc != crc32fast::hash(&record[4..]) {
            bail!("naive log: bad crc at offset {offset}");
        }
        record.drain(..HEADER_LEN + key.len());
        Ok(Some(record))
    }
}
