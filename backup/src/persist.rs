//! The hot image on disk (`understudy backup --image-dir DIR`), crash-consistently.
//!
//! ```text
//!  DIR/image     the pages, in the protocol's index order (page i at offset i * 4096)
//!  DIR/meta      magic, version, page count, epoch C, the image digest at C, CRC
//!                (replaced atomically: written to meta.tmp, fsynced, renamed, dir fsynced)
//!  DIR/journal   one record per committed epoch after C, appended and fdatasynced:
//!                magic, length, epoch, page count, state length, digest,
//!                page indices, pages, VM state, CRC32 of everything before it
//! ```
//!
//! A writer thread takes each committed epoch (its pages, read back from the hot image, its
//! digest and VM state): it appends the record to the journal and syncs it, and only then
//! writes the pages into `image`. Every page in `image` therefore comes from a record that is
//! durable; every so often `image` is synced, `meta` moves to the last record's epoch and the
//! journal is emptied. Loading reads `image`, then replays the journal's records after C in
//! order up to the first torn or corrupt one, so a crash at any point leaves the last durable
//! committed epoch intact; the digest it recorded is checked against the loaded pages.
//! Persistence is off the Ack path: an epoch may be acknowledged before it is on disk.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use tracing::{error, info, warn};
#[cfg(test)]
use understudy_protocol::PageImage;
use understudy_protocol::{Digest, Page, PageTree, PAGE_SIZE};

const META_MAGIC: &[u8; 8] = b"USIMAGE1";
const RECORD_MAGIC: u32 = 0x4e52_4a55; // "UJRN"
/// Records above this size are not read back (a corrupt length must not allocate wildly).
const MAX_RECORD: u64 = 1 << 31;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds an image of {1} pages, not {2}: it belongs to another VM layout (move it away or use another --image-dir)")]
    Layout(PathBuf, u64, u64),
    #[error("the image in {path} does not match the digest recorded for epoch {epoch}: the files are damaged (move them away; the next session sends a full sync)")]
    Digest { path: PathBuf, epoch: u64 },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PersistError {
    let path = path.to_path_buf();
    move |source| PersistError::Io { what, path, source }
}

/// One committed epoch, as stored.
pub(crate) struct Record {
    pub epoch: u64,
    pub digest: Digest,
    pub pages: Vec<u32>,
    /// `pages.len()` pages, in that order.
    pub data: Vec<u8>,
    /// The VM state blob (empty for a full-sync epoch).
    pub state: Vec<u8>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(64 + self.pages.len() * (4 + PAGE_SIZE) + self.state.len());
        out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // length, filled in below
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.state.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.digest.0);
        for p in &self.pages {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.state);
        let len = out.len() as u64 + 4;
        out[4..12].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes one record from the front of `buf`; `None` if it is torn or corrupt.
    fn decode(buf: &[u8], page_count: u64) -> Option<(Record, usize)> {
        let u32_at = |o: usize| {
            buf.get(o..o + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        };
        let u64_at = |o: usize| {
            buf.get(o..o + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        };
        if u32_at(0)? != RECORD_MAGIC {
            return None;
        }
        let len = u64_at(4)?;
        if !(64..=MAX_RECORD).contains(&len) || len as usize > buf.len() {
            return None;
        }
        let len = len as usize;
        let crc = u32_at(len - 4)?;
        if crc32fast::hash(&buf[..len - 4]) != crc {
            return None;
        }
        let epoch = u64_at(12)?;
        let n = u32_at(20)? as usize;
        let state_len = u32_at(24)? as usize;
        let digest = Digest(buf.get(28..60)?.try_into().ok()?);
        let idx_end = 60 + n * 4;
        let data_end = idx_end + n * PAGE_SIZE;
        if data_end + state_len + 4 != len {
            return None;
        }
        let pages: Vec<u32> = (0..n).map(|i| u32_at(60 + i * 4)).collect::<Option<_>>()?;
        if pages.iter().any(|&p| u64::from(p) >= page_count) {
            return None;
        }
        Some((
            Record {
                epoch,
                digest,
                pages,
                data: buf[idx_end..data_end].to_vec(),
                state: buf[data_end..data_end + state_len].to_vec(),
            },
            len,
        ))
    }
}

/// The `meta` file: the epoch `image` holds once synced.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Meta {
    pages: u64,
    epoch: u64,
    digest: Digest,
}

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(META_MAGIC);
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.digest.0);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<Meta> {
        if b.len() != 60 || &b[..8] != META_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[56..60].try_into().ok()?);
        if crc32fast::hash(&b[..56]) != crc {
            return None;
        }
        Some(Meta {
            pages: u64::from_le_bytes(b[8..16].try_into().ok()?),
            epoch: u64::from_le_bytes(b[16..24].try_into().ok()?),
            digest: Digest(b[24..56].try_into().ok()?),
        })
    }
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<(), PersistError> {
    let tmp = dir.join("meta.tmp");
    let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(&meta.encode()).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    let path = dir.join("meta");
    std::fs::rename(&tmp, &path).map_err(io("renaming into", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory", dir))
}

/// What [`load`] found.
pub(crate) struct Loaded {
    /// The last durable committed epoch (in the numbering of the session that wrote it).
    pub epoch: u64,
    /// Its image digest (checked against the loaded pages).
    pub digest: Digest,
    /// The VM state of the last consistent epoch among those loaded, if any.
    pub state: Option<(u64, Vec<u8>)>,
    /// Journal records replayed after the image's checkpoint.
    pub replayed: usize,
    /// Bytes at the journal's start that hold whole, valid records (a torn tail follows).
    pub journal_valid: u64,
}

/// Where [`load`] puts the pages.
pub(crate) trait LoadTarget {
    fn page_count(&self) -> u64;
    fn put(&mut self, index: u32, data: &Page);
    fn digest(&mut self) -> Digest;
}

/// Loads into a [`PageImage`] (which must be zeroed).
#[cfg(test)]
pub(crate) struct IntoImage<'a, I: PageImage + ?Sized>(pub &'a mut I);

#[cfg(test)]
impl<I: PageImage + ?Sized> LoadTarget for IntoImage<'_, I> {
    fn page_count(&self) -> u64 {
        self.0.page_count()
    }
    fn put(&mut self, index: u32, data: &Page) {
        self.0.write_page(index, data);
    }
    fn digest(&mut self) -> Digest {
        PageTree::from_image(self.0).digest()
    }
}

/// Keeps only each page's hash: checks a stored image without holding it in memory.
pub(crate) struct HashesOnly(pub Vec<understudy_protocol::PageHash>);

impl LoadTarget for HashesOnly {
    fn page_count(&self) -> u64 {
        self.0.len() as u64
    }
    fn put(&mut self, index: u32, data: &Page) {
        self.0[index as usize] = understudy_protocol::digest::hash_page(data);
    }
    fn digest(&mut self) -> Digest {
        PageTree::from_hashes(self.0.clone()).digest()
    }
}

/// Loads into the backup's hot image, keeping each page's hash for the replica's tree.
pub(crate) struct IntoHot<'a, I: understudy_protocol::PageImage + ?Sized> {
    pub image: &'a mut I,
    pub hashes: Vec<understudy_protocol::PageHash>,
}

impl<I: understudy_protocol::PageImage + ?Sized> LoadTarget for IntoHot<'_, I> {
    fn page_count(&self) -> u64 {
        self.hashes.len() as u64
    }
    fn put(&mut self, index: u32, data: &Page) {
        self.image.write_page(index, data);
        self.hashes[index as usize] = understudy_protocol::digest::hash_page(data);
    }
    fn digest(&mut self) -> Digest {
        PageTree::from_hashes(self.hashes.clone()).digest()
    }
}

/// The page count of the image stored in `dir`, if it holds one.
pub(crate) fn stored_pages(dir: &Path) -> Option<u64> {
    std::fs::read(dir.join("meta"))
        .ok()
        .and_then(|b| Meta::decode(&b))
        .map(|m| m.pages)
}

/// Loads the image in `dir` into `image`; `None` if `dir` holds none.
pub(crate) fn load(dir: &Path, image: &mut dyn LoadTarget) -> Result<Option<Loaded>, PersistError> {
    let meta_path = dir.join("meta");
    let Some(meta) = std::fs::read(&meta_path)
        .ok()
        .and_then(|b| Meta::decode(&b))
    else {
        return Ok(None);
    };
    let pages = image.page_count();
    if meta.pages != pages {
        return Err(PersistError::Layout(dir.to_path_buf(), meta.pages, pages));
    }
    let path = dir.join("image");
    let f = File::open(&path).map_err(io("opening", &path))?;
    let mut page = [0u8; PAGE_SIZE];
    for i in 0..pages {
        match f.read_exact_at(&mut page, i * PAGE_SIZE as u64) {
            Ok(()) => image.put(i as u32, &page),
            // A sparse tail reads short: those pages are zero, as `image` already is.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io("reading", &path)(e)),
        }
    }
    let mut loaded = Loaded {
        epoch: meta.epoch,
        digest: meta.digest,
        state: None,
        replayed: 0,
        journal_valid: 0,
    };
    let jpath = dir.join("journal");
    let mut buf = Vec::new();
    if let Ok(mut j) = File::open(&jpath) {
        j.read_to_end(&mut buf).map_err(io("reading", &jpath))?;
    }
    let mut at = 0;
    while let Some((r, len)) = Record::decode(&buf[at..], pages) {
        at += len;
        if r.epoch <= loaded.epoch {
            continue; // already in the image (a checkpoint that did not empty the journal)
        }
        for (p, data) in r.pages.iter().zip(r.data.chunks_exact(PAGE_SIZE)) {
            image.put(*p, data.try_into().expect("PAGE_SIZE chunks"));
        }
        loaded.epoch = r.epoch;
        loaded.digest = r.digest;
        if !r.state.is_empty() {
            loaded.state = Some((r.epoch, r.state));
        }
        loaded.replayed += 1;
    }
    loaded.journal_valid = at as u64;
    if at < buf.len() {
        warn!(
            bytes = buf.len() - at,
            "the journal ends in a torn or damaged record (a crash while writing it): ignored"
        );
    }
    if loaded.state.is_none() {
        // The checkpoint's own state, kept beside it.
        if let Ok(s) = std::fs::read(dir.join("state")) {
            if !s.is_empty() {
                loaded.state = Some((meta.epoch, s));
            }
        }
    }
    if image.digest() != loaded.digest {
        return Err(PersistError::Digest {
            path: dir.to_path_buf(),
            epoch: loaded.epoch,
        });
    }
    Ok(Some(loaded))
}

enum Msg {
    Record(Record),
    /// Forget everything: a new session starts from a zeroed image.
    Reset,
    /// Answer once everything before it is written.
    Flush(mpsc::SyncSender<()>),
}

/// The writer thread's handle. Errors (a full disk) are kept in `failed` and end persisting;
/// the session checks it and ends, so that the primary knows this backup is not durable.
pub(crate) struct Persister {
    tx: mpsc::SyncSender<Msg>,
    failed: Arc<Mutex<Option<String>>>,
}

/// A handle that queues records from another thread.
pub(crate) struct RecordSender(mpsc::SyncSender<Msg>);

impl RecordSender {
    /// Queues a committed epoch (blocks if the disk is far behind: bounded memory).
    pub fn record(&self, r: Record) {
        let _ = self.0.send(Msg::Record(r));
    }
}

impl Persister {
    /// Starts the writer for an image of `pages` pages in `dir` (created if missing). With
    /// `resumed` (what [`load`] found), the stored image goes on: the journal's torn tail, if
    /// any, is cut off so that new records follow the last valid one. Without it, the caller
    /// resets the store.
    pub fn start(
        dir: &Path,
        pages: u64,
        resumed: Option<&Loaded>,
        starter: Option<&crate::VmThread>,
    ) -> Result<Persister, PersistError> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let failed = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::sync_channel::<Msg>(64);
        let mut w = Writer::open(dir, pages)?;
        if let Some(l) = resumed {
            w.resume(l)?;
        }
        let f = Arc::clone(&failed);
        // From the start thread when there is one: at the process's original priority.
        let run = move || {
            for m in rx {
                let r = match m {
                    Msg::Record(r) => w.append(r),
                    Msg::Reset => w.reset(),
                    Msg::Flush(done) => {
                        let _ = done.send(());
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    error!(error = %e, "persisting the image failed; it is no longer kept on disk");
                    *f.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    return;
                }
            }
        };
        match starter {
            Some(t) => t.spawn_thread("persist", run),
            None => std::thread::Builder::new()
                .name("persist".into())
                .spawn(run)
                .map(drop),
        }
        .map_err(io("starting the writer for", dir))?;
        Ok(Persister { tx, failed })
    }

    /// Queues a committed epoch (blocks if the disk is far behind: bounded memory).
    #[cfg(test)]
    pub fn record(&self, r: Record) {
        let _ = self.tx.send(Msg::Record(r));
    }

    /// A handle for the thread that applies epochs.
    pub fn sender(&self) -> RecordSender {
        RecordSender(self.tx.clone())
    }

    /// Forgets the stored image (a new session starts from zeros).
    pub fn reset(&self) {
        let _ = self.tx.send(Msg::Reset);
    }

    /// Waits until everything queued so far is on disk (or persisting failed).
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Why persisting stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

struct Writer {
    dir: PathBuf,
    pages: u64,
    image: File,
    journal: File,
    journal_len: u64,
    last: Option<(u64, Digest)>,
    last_state: Vec<u8>,
}

/// The journal is folded into the image when it grows past this (or past the image's size).
const CHECKPOINT_BYTES: u64 = 64 << 20;

impl Writer {
    fn open(dir: &Path, pages: u64) -> Result<Writer, PersistError> {
        let ipath = dir.join("image");
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&ipath)
            .map_err(io("opening", &ipath))?;
        let jpath = dir.join("journal");
        let mut journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&jpath)
            .map_err(io("opening", &jpath))?;
        let journal_len = journal
            .seek(SeekFrom::End(0))
            .map_err(io("reading", &jpath))?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            pages,
            image,
            journal,
            journal_len,
            last: None,
            last_state: Vec::new(),
        })
    }

    /// Goes on from a loaded image: cuts the journal after its last valid record.
    fn resume(&mut self, l: &Loaded) -> Result<(), PersistError> {
        let jpath = self.dir.join("journal");
        if self.journal_len != l.journal_valid {
            self.journal
                .set_len(l.journal_valid)
                .and_then(|()| self.journal.sync_all())
                .map_err(io("cutting the torn tail of", &jpath))?;
            self.journal_len = l.journal_valid;
        }
        self.last = Some((l.epoch, l.digest));
        if let Some((_, state)) = &l.state {
            self.last_state = state.clone();
        }
        Ok(())
    }

    fn append(&mut self, r: Record) -> Result<(), PersistError> {
        let jpath = self.dir.join("journal");
        let bytes = r.encode();
        self.journal
            .write_all(&bytes)
            .and_then(|()| self.journal.sync_data())
            .map_err(io("appending to", &jpath))?;
        self.journal_len += bytes.len() as u64;
        let ipath = self.dir.join("image");
        for (p, data) in r.pages.iter().zip(r.data.chunks_exact(PAGE_SIZE)) {
            self.image
                .write_all_at(data, u64::from(*p) * PAGE_SIZE as u64)
                .map_err(io("writing", &ipath))?;
        }
        self.last = Some((r.epoch, r.digest));
        if !r.state.is_empty() {
            self.last_state = r.state;
        }
        if self.journal_len
            > CHECKPOINT_BYTES
                .min(self.pages * PAGE_SIZE as u64)
                .max(1 << 20)
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Syncs `image`, moves `meta` to the last record and empties the journal.
    fn checkpoint(&mut self) -> Result<(), PersistError> {
        let Some((epoch, digest)) = self.last else {
            return Ok(());
        };
        let ipath = self.dir.join("image");
        self.image.sync_all().map_err(io("syncing", &ipath))?;
        // The state that goes with the checkpoint, in case no later record carries one.
        let spath = self.dir.join("state");
        let tmp = self.dir.join("state.tmp");
        std::fs::write(&tmp, &self.last_state)
            .and_then(|()| File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &spath))
            .map_err(io("writing", &spath))?;
        write_meta(
            &self.dir,
            &Meta {
                pages: self.pages,
                epoch,
                digest,
            },
        )?;
        let jpath = self.dir.join("journal");
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_all())
            .map_err(io("emptying", &jpath))?;
        self.journal_len = 0;
        info!(epoch, "image checkpointed to disk");
        Ok(())
    }

    fn reset(&mut self) -> Result<(), PersistError> {
        let ipath = self.dir.join("image");
        let jpath = self.dir.join("journal");
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_all())
            .map_err(io("emptying", &jpath))?;
        self.journal_len = 0;
        self.image
            .set_len(0)
            .and_then(|()| self.image.set_len(self.pages * PAGE_SIZE as u64))
            .and_then(|()| self.image.sync_all())
            .map_err(io("clearing", &ipath))?;
        let _ = std::fs::remove_file(self.dir.join("state"));
        self.last = None;
        self.last_state.clear();
        write_meta(
            &self.dir,
            &Meta {
                pages: self.pages,
                epoch: 0,
                digest: PageTree::zeroed(self.pages as u32).digest(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain in-memory image.
    struct Mem(Vec<u8>);
    impl PageImage for Mem {
        fn page_count(&self) -> u64 {
            (self.0.len() / PAGE_SIZE) as u64
        }
        fn read_page(&self, index: u32, out: &mut understudy_protocol::Page) {
            let o = index as usize * PAGE_SIZE;
            out.copy_from_slice(&self.0[o..o + PAGE_SIZE]);
        }
        fn write_page(&mut self, index: u32, data: &understudy_protocol::Page) {
            let o = index as usize * PAGE_SIZE;
            self.0[o..o + PAGE_SIZE].copy_from_slice(data);
        }
    }

    const PAGES: u64 = 64;

    /// Epoch `e` writes byte `e` into pages e, e+1 (mod PAGES); returns the record and
    /// applies it to `truth`.
    fn epoch(e: u64, truth: &mut Mem) -> Record {
        let pages = vec![(e % PAGES) as u32, ((e + 1) % PAGES) as u32];
        let mut data = Vec::new();
        for p in &pages {
            let page = [e as u8; PAGE_SIZE];
            truth.write_page(*p, &page);
            data.extend_from_slice(&page);
        }
        Record {
            epoch: e,
            digest: PageTree::from_image(truth).digest(),
            pages,
            data,
            state: if e.is_multiple_of(2) {
                vec![e as u8; 10]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn a_reload_gives_the_last_durable_epoch_and_ignores_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut truth = Mem(vec![0; PAGES as usize * PAGE_SIZE]);
        let p = Persister::start(d, PAGES, None, None).unwrap();
        p.reset();
        let mut want = None;
        for e in 1..=5 {
            let r = epoch(e, &mut truth);
            want = Some((e, r.digest, truth.0.clone()));
            p.record(r);
        }
        p.flush();
        drop(p);
        // A crash in the middle of the next record: half of it on disk.
        let torn = epoch(6, &mut Mem(truth.0.clone())).encode();
        let mut j = OpenOptions::new()
            .append(true)
            .open(d.join("journal"))
            .unwrap();
        j.write_all(&torn[..torn.len() / 2]).unwrap();
        let mut back = Mem(vec![0; PAGES as usize * PAGE_SIZE]);
        let l = load(d, &mut IntoImage(&mut back))
            .unwrap()
            .expect("an image");
        let (e, digest, bytes) = want.unwrap();
        assert_eq!((l.epoch, l.digest), (e, digest));
        assert_eq!(l.replayed, 5);
        assert_eq!(l.state.map(|s| s.0), Some(4));
        assert!(back.0 == bytes, "the loaded image differs from epoch {e}");
    }

    #[test]
    fn a_damaged_image_is_refused_by_its_digest_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut truth = Mem(vec![0; PAGES as usize * PAGE_SIZE]);
        let p = Persister::start(d, PAGES, None, None).unwrap();
        p.reset();
        for e in 1..=3 {
            p.record(epoch(e, &mut truth));
        }
        p.flush();
        drop(p);
        // The journal is fine, but a page the records do not cover is damaged in `image`.
        let f = OpenOptions::new()
            .write(true)
            .open(d.join("image"))
            .unwrap();
        f.write_all_at(&[0xEE; 16], 40 * PAGE_SIZE as u64).unwrap();
        let mut back = Mem(vec![0; PAGES as usize * PAGE_SIZE]);
        assert!(matches!(
            load(d, &mut IntoImage(&mut back)),
            Err(PersistError::Digest { epoch: 3, .. })
        ));
        // Another layout is refused with a reason.
        let mut small = Mem(vec![0; 8 * PAGE_SIZE]);
        assert!(matches!(
            load(d, &mut IntoImage(&mut small)),
            Err(PersistError::Layout(..))
        ));
    }

    #[test]
    fn a_checkpoint_folds_the_journal_into_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut truth = Mem(vec![0; PAGES as usize * PAGE_SIZE]);
        let mut w = Writer::open(d, PAGES).unwrap();
        w.reset().unwrap();
        for e in 1..=3 {
            w.append(epoch(e, &mut truth)).unwrap();
        }
        w.checkpoint().unwrap();
        assert_eq!(std::fs::metadata(d.join("journal")).unwrap().len(), 0);
        w.append(epoch(4, &mut truth)).unwrap();
        let mut back = Mem(vec![0; PAGES as usize * PAGE_SIZE]);
        let l = load(d, &mut IntoImage(&mut back)).unwrap().unwrap();
        assert_eq!((l.epoch, l.replayed), (4, 1));
        assert!(back.0 == truth.0);
        assert_eq!(l.state.map(|s| s.0), Some(4));
    }
}
