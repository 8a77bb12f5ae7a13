//! Owns the temporary files bodies spill into: created unlinked in `[buffering] temp_dir`
//! (nothing is left behind after a crash or a `kill -9`), written and read on tokio's blocking
//! pool (never on a worker's event loop), counted in `kaproxy_body_buffer_bytes{location="disk"}`
//! and closed, off the event loop too, when the last reader lets go.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;

use super::budget::Buffering;
use super::BodyError;

/// How much of a spilled body is read back at once.
pub const READ_CHUNK: usize = 64 * 1024;

pub use crate::metrics::BodyDirection as Direction;

/// A temporary file could not be created or written: the directory is named, so the log line
/// says where (a full disk, a directory removed or unwritable).
#[derive(Debug, thiserror::Error)]
#[error("temporary file in {dir}: {source}")]
pub struct SpillError {
    pub dir: PathBuf,
    #[source]
    pub source: io::Error,
}

/// An open, unlinked temporary file; closed on the blocking pool (closing a large file frees
/// its blocks, which may take a while).
struct TempFile(Option<File>);

impl Drop for TempFile {
    fn drop(&mut self) {
        let Some(file) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(file))),
            Err(_) => drop(file),
        }
    }
}

/// A body's temporary file: bytes are appended (or written again from the start, see
/// [`SpillFile::rewind`]) by its one writer and read back at any offset already written.
pub struct SpillFile {
    file: Arc<TempFile>,
    /// Bytes written so far (the readable length).
    len: u64,
    /// Set by `rewind`: the next write truncates the file first, freeing its blocks.
    truncate: bool,
    buffering: Buffering,
    dir: PathBuf,
}

impl SpillFile {
    /// Creates an unlinked temporary file in `buffering`'s directory (O_TMPFILE where the
    /// file system has it, else created and unlinked at once) and counts the spill.
    pub async fn create(buffering: &Buffering, direction: Direction) -> Result<Self, SpillError> {
        let dir = buffering.dir().to_path_buf();
        let at = dir.clone();
        let created = tokio::task::spawn_blocking(move || tempfile::tempfile_in(at))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        let metrics = buffering.metrics();
        match created {
            Ok(file) => {
                metrics.spilled(direction);
                Ok(SpillFile {
                    file: Arc::new(TempFile(Some(file))),
                    len: 0,
                    truncate: false,
                    buffering: buffering.clone(),
                    dir,
                })
            }
            Err(source) => {
                metrics.spill_failed(direction);
                Err(SpillError { dir, source })
            }
        }
    }

    /// Bytes written and readable.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`.
    pub async fn append(&mut self, data: Bytes) -> Result<(), SpillError> {
        let n = data.len() as u64;
        self.write_at(data, self.len).await?;
        self.commit(n);
        Ok(())
    }

    /// Writes `data` at `at` without counting it readable yet; [`SpillFile::commit`] does.
    /// The relay writes while its reader reads what was committed before.
    pub fn write_at(
        &mut self,
        data: Bytes,
        at: u64,
    ) -> impl Future<Output = Result<(), SpillError>> + Send + 'static {
        let file = self.file.clone();
        let truncate = std::mem::take(&mut self.truncate);
        let dir = self.dir.clone();
        async move {
            let written = tokio::task::spawn_blocking(move || {
                let f = file.0.as_ref().expect("open until dropped");
                let written = match truncate {
                    true => f.set_len(0).and_then(|()| f.write_all_at(&data, at)),
                    false => f.write_all_at(&data, at),
                };
                // The data goes back to be freed on the worker that allocated it.
                (written, data)
            })
            .await;
            let written = match written {
                Ok((written, data)) => {
                    drop(data);
                    written
                }
                Err(e) => Err(io::Error::other(e)),
            };
            written.map_err(|source| SpillError { dir, source })
        }
    }

    /// Counts `n` bytes written by [`SpillFile::write_at`] as readable.
    pub fn commit(&mut self, n: u64) {
        self.len += n;
        self.buffering.metrics().disk.inc_by(n as i64);
    }

    /// Forgets everything written (all of it has been read): the next write starts at 0
    /// again and truncates the file first.
    pub fn rewind(&mut self) {
        self.buffering.metrics().disk.dec_by(self.len as i64);
        self.len = 0;
        self.truncate = true;
    }

    /// Reads up to `max` bytes at `at` on the blocking pool.
    pub fn read_at(&self, at: u64, max: usize) -> JoinHandle<io::Result<Bytes>> {
        read_at(self.file.clone(), at, max)
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        self.buffering.metrics().disk.dec_by(self.len as i64);
    }
}

fn read_at(file: Arc<TempFile>, at: u64, max: usize) -> JoinHandle<io::Result<Bytes>> {
    // Allocated here, on the worker, so that it is freed into the same allocator heap: a
    // buffer allocated on a blocking thread and freed on a worker leaves that thread's heap
    // holding pages nobody reuses.
    let mut buf = vec![0u8; max];
    tokio::task::spawn_blocking(move || {
        let f = file.0.as_ref().expect("open until dropped");
        let mut filled = 0;
        while filled < max {
            match f.read_at(&mut buf[filled..], at + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "temporary file shorter than written",
            ));
        }
        buf.truncate(filled);
        Ok(Bytes::from(buf))
    })
}

/// A body read back from a temporary file written whole, a chunk at a time on the blocking
/// pool: a request body read whole, sent again on a retry. It keeps the file (and its disk
/// bytes counted) until the last reader is gone.
pub struct FileReader {
    spill: Arc<SpillFile>,
    offset: u64,
    pending: Option<JoinHandle<io::Result<Bytes>>>,
}

impl FileReader {
    pub fn whole(spill: Arc<SpillFile>) -> FileReader {
        FileReader {
            spill,
            offset: 0,
            pending: None,
        }
    }

    /// Another reader of the same file, from its start (a retry).
    pub fn replay(&self) -> FileReader {
        FileReader::whole(self.spill.clone())
    }

    fn remaining(&self) -> u64 {
        self.spill.len() - self.offset
    }
}

impl Body for FileReader {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.remaining() == 0 {
            return Poll::Ready(None);
        }
        if this.pending.is_none() {
            let max = this.remaining().min(READ_CHUNK as u64) as usize;
            this.pending = Some(this.spill.read_at(this.offset, max));
        }
        let pending = this.pending.as_mut().expect("set above");
        let read = ready!(Pin::new(pending).poll(cx)).unwrap_or_else(|e| Err(io::Error::other(e)));
        this.pending = None;
        match read {
            Ok(data) => {
                this.offset += data.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Err(source) => Poll::Ready(Some(Err(BodyError::Spill(SpillError {
                dir: this.spill.dir.clone(),
                source,
            })))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::BufferingConfig;
    use http_body_util::BodyExt;

    pub(crate) fn buffering_in(dir: &std::path::Path, limit: usize) -> Buffering {
        let cfg = BufferingConfig {
            memory_limit: limit,
            temp_dir: Some(dir.to_path_buf()),
        };
        Buffering::new(&cfg, crate::metrics::Metrics::new().buffering())
    }

    #[tokio::test]
    async fn a_spilled_body_reads_back_whole_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 0);
        let mut spill = SpillFile::create(&b, Direction::Request).await.unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(7_000) {
            spill.append(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert_eq!(spill.len(), data.len() as u64);
        assert_eq!(b.disk_bytes(), data.len() as u64);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "unlinked at creation"
        );
        let spill = Arc::new(spill);
        let first = FileReader::whole(spill.clone());
        let again = first.replay();
        let read = first.collect().await.unwrap().to_bytes();
        assert_eq!(read.as_ref(), data.as_slice());
        let read = again.collect().await.unwrap().to_bytes();
        assert_eq!(
            read.as_ref(),
            data.as_slice(),
            "a replay reads it all again"
        );
        drop(spill);
        assert_eq!(b.disk_bytes(), 0, "given back with the last reader");
    }

    #[tokio::test]
    async fn a_missing_directory_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let b = buffering_in(&gone, 0);
        let err = SpillFile::create(&b, Direction::Response)
            .await
            .err()
            .expect("no such directory");
        assert_eq!(err.dir, gone);
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[tokio::test]
    async fn a_rewound_file_is_written_again_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 0);
        let mut spill = SpillFile::create(&b, Direction::Response).await.unwrap();
        spill
            .append(Bytes::from_static(b"first part"))
            .await
            .unwrap();
        spill.rewind();
        assert_eq!((spill.len(), b.disk_bytes()), (0, 0));
        spill.write_at(Bytes::from_static(b"two"), 0).await.unwrap();
        spill.commit(3);
        let read = spill.read_at(0, 100).await.unwrap().unwrap();
        assert_eq!(read.as_ref(), b"two", "truncated before the write");
    }
}
