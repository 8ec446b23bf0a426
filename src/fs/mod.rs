//! The mounted filesystem's logic, with no FUSE in it: the inode table, open handles, and the
//! operations the adapter in `fuse.rs` translates. Tests drive this type directly.
//!
//! Layout: `/live/<disk>.img` is the tracked live disk (every write goes through
//! `LiveDisk::write_at`, which stamps the tracker before the data lands), and
//! `/<point>/<disk>.img` is a read-only image from a `PointSource`. The root is re-listed from
//! the `PointSource` on every lookup and readdir, so points come and go without a remount.
//! Point inodes are keyed by the point's name *and id*: a point that vanished loses its
//! inodes, and a later point of the same name gets fresh ones (and a fresh page cache, which
//! matters because point images are cached across opens) even when nothing listed the root in
//! between. An image that stops being current (a checkpoint whose backup committed) is opened
//! again from the same point, for the node and for open handles alike; if the point is gone,
//! reads fail with ESTALE, never with another point's or the live disk's bytes.
//!
//! Invariants kept here: nothing in the mount changes a point or the layout (EROFS), a live
//! disk never changes size (EPERM), and no write reaches a live image without the tracker.

pub mod fuse;
pub mod page_store;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;

use crate::engine::Engine;
use crate::error::{Error, FsKind, Result};
use crate::image::{Decoded, ImageSource, PointList, PointSource};
use crate::live::LiveDisk;

pub const ROOT_INO: u64 = 1;
pub const LIVE_INO: u64 = 2;
/// The live directory's name; never a point (names::validate refuses it).
pub const LIVE_DIR: &str = "live";
/// Extended attribute on the root that names the store, so `vmref umount MOUNTPOINT` can find
/// the daemon's store (and wait for its lock) without being told which store it was.
pub const STORE_XATTR: &str = "user.vmref.store";
const IMG: &str = ".img";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// What `stat` shows for one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte units of data actually present.
    pub blocks: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

/// How a file was opened, so the adapter can pick the kernel caching mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A live disk: its bytes change under us, so no cache is kept across opens.
    Live,
    /// A point image: its bytes never change, so the page cache may be kept.
    Point,
}

/// The changes a `setattr` asks for; times are accepted and ignored on live disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub times: bool,
}

/// `lseek` whence values that reach a FUSE filesystem (the kernel does the others itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whence {
    Data,
    Hole,
}

impl Whence {
    pub fn from_raw(w: i32) -> Result<Whence> {
        match w {
            libc::SEEK_DATA => Ok(Whence::Data),
            libc::SEEK_HOLE => Ok(Whence::Hole),
            _ => Err(fs_err(FsKind::BadWhence, format!("whence {w}"))),
        }
    }
}

enum Node {
    Root,
    LiveDir,
    Live {
        disk: String,
    },
    PointDir {
        point: String,
        id: String,
    },
    PointFile {
        point: String,
        id: String,
        disk: String,
        size: u64,
        /// Opened on first use and kept while current: a point's bytes never change.
        image: RwLock<Option<Arc<dyn ImageSource>>>,
    },
}

impl Node {
    fn path(&self) -> String {
        match self {
            Node::Root => "/".into(),
            Node::LiveDir => format!("/{LIVE_DIR}"),
            Node::Live { disk } => format!("/{LIVE_DIR}/{disk}{IMG}"),
            Node::PointDir { point, .. } => format!("/{point}"),
            Node::PointFile { point, disk, .. } => format!("/{point}/{disk}{IMG}"),
        }
    }

    /// The inode table's key: the path, and for points the point's id too.
    fn key(&self) -> String {
        match self {
            Node::PointDir { id, .. } | Node::PointFile { id, .. } => {
                format!("{}\0{id}", self.path())
            }
            _ => self.path(),
        }
    }

    fn point_file(point: &str, id: &str, disk: &str, size: u64) -> Node {
        Node::PointFile {
            point: point.to_string(),
            id: id.to_string(),
            disk: disk.to_string(),
            size,
            image: RwLock::new(None),
        }
    }
}

/// Inode numbers are never reused while mounted: the kernel may still hold an old one.
struct Inodes {
    by_path: HashMap<String, u64>,
    nodes: HashMap<u64, Arc<Node>>,
    next: u64,
}

enum Handle {
    Live(Arc<LiveDisk>),
    /// The point file's inode, and its image as opened (replaced if it stops being current).
    Point(u64, Arc<dyn ImageSource>),
    Dir(Arc<Vec<Entry>>),
}

/// How often an image that stopped being current is opened again before giving up (each
/// reopen finds the point's newer home, so more than one is a race with a closing checkpoint).
const REOPEN_TRIES: usize = 3;

/// The filesystem. Shared by the FUSE worker threads; every method takes `&self`.
///
/// The inode and handle tables sit behind coarse `RwLock`s: they are touched for a map lookup
/// and an `Arc` clone per request, and all disk I/O happens after the lock is released.
pub struct Fs {
    /// None for a mount of a repository's published points, which has no live disks.
    engine: Option<Arc<Engine>>,
    points: Arc<dyn PointSource>,
    uid: u32,
    gid: u32,
    mounted: SystemTime,
    inodes: RwLock<Inodes>,
    handles: RwLock<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
}

fn fs_err(kind: FsKind, path: impl Into<String>) -> Error {
    Error::Fs {
        kind,
        path: path.into(),
    }
}

fn disk_of(name: &str) -> Option<&str> {
    name.strip_suffix(IMG).filter(|d| !d.is_empty())
}

/// Point names the mount can show: `live` and anything a path could not carry are skipped.
fn showable(point: &str) -> bool {
    !point.is_empty() && point != LIVE_DIR && !point.starts_with('.') && !point.contains('/')
}

impl Fs {
    pub fn new(engine: Arc<Engine>, points: Arc<dyn PointSource>, uid: u32, gid: u32) -> Fs {
        Fs::with(Some(engine), points, uid, gid)
    }

    /// Point directories only: no `live/` (a repository mounted without its stores).
    pub fn points_only(points: Arc<dyn PointSource>, uid: u32, gid: u32) -> Fs {
        Fs::with(None, points, uid, gid)
    }

    fn with(engine: Option<Arc<Engine>>, points: Arc<dyn PointSource>, uid: u32, gid: u32) -> Fs {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, Arc::new(Node::Root));
        nodes.insert(LIVE_INO, Arc::new(Node::LiveDir));
        let by_path = HashMap::from([
            (Node::Root.path(), ROOT_INO),
            (Node::LiveDir.path(), LIVE_INO),
        ]);
        Fs {
            engine,
            points,
            uid,
            gid,
            mounted: SystemTime::now(),
            inodes: RwLock::new(Inodes {
                by_path,
                nodes,
                next: LIVE_INO + 1,
            }),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.as_ref()
    }

    /// A live disk; not found where there are no live disks.
    fn live(&self, disk: &str) -> Result<Arc<LiveDisk>> {
        match &self.engine {
            Some(e) => e.disk(disk),
            None => Err(fs_err(FsKind::NotFound, format!("/{LIVE_DIR}/{disk}{IMG}"))),
        }
    }

    fn node(&self, ino: u64) -> Result<Arc<Node>> {
        self.inodes
            .read()
            .nodes
            .get(&ino)
            .cloned()
            .ok_or_else(|| fs_err(FsKind::NotFound, format!("inode {ino}")))
    }

    fn intern(&self, node: Node) -> u64 {
        let path = node.key();
        if let Some(&ino) = self.inodes.read().by_path.get(&path) {
            return ino;
        }
        let mut t = self.inodes.write();
        if let Some(&ino) = t.by_path.get(&path) {
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        t.by_path.insert(path, ino);
        t.nodes.insert(ino, Arc::new(node));
        ino
    }

    /// The current points, with the inodes of vanished ones dropped.
    fn refresh_points(&self) -> Result<PointList> {
        let mut list = self.points.points()?;
        list.retain(|p| showable(&p.name));
        let present = |p: &str, id: &str, d: Option<&str>| {
            list.iter().any(|e| {
                e.name == p && e.id == id && d.is_none_or(|d| e.disks.iter().any(|(dn, _)| dn == d))
            })
        };
        let stale = |n: &Node| match n {
            Node::PointDir { point, id } => !present(point, id, None),
            Node::PointFile {
                point, id, disk, ..
            } => !present(point, id, Some(disk)),
            _ => false,
        };
        if self.inodes.read().nodes.values().any(|n| stale(n)) {
            let mut t = self.inodes.write();
            let gone: Vec<u64> = t
                .nodes
                .iter()
                .filter(|(_, n)| stale(n))
                .map(|(&i, _)| i)
                .collect();
            for ino in gone {
                if let Some(n) = t.nodes.remove(&ino) {
                    t.by_path.remove(&n.key());
                }
            }
        }
        Ok(list)
    }

    /// The disks of the point `point` with id `id`; NotFound once the name means another point.
    fn point_disks(&self, point: &str, id: &str) -> Result<Vec<(String, u64)>> {
        self.refresh_points()?
            .into_iter()
            .find(|p| p.name == point && p.id == id)
            .map(|p| p.disks)
            .ok_or_else(|| fs_err(FsKind::NotFound, format!("/{point}")))
    }

    /// The node's image, opened again if the one kept stopped being current.
    fn image(&self, node: &Node) -> Result<Arc<dyn ImageSource>> {
        let Node::PointFile {
            point,
            id,
            disk,
            image,
            ..
        } = node
        else {
            return Err(fs_err(FsKind::IsDir, node.path()));
        };
        if let Some(i) = image.read().as_ref().filter(|i| i.is_current()) {
            return Ok(i.clone());
        }
        for _ in 0..REOPEN_TRIES {
            let opened = self.points.open(point, id, disk)?;
            if opened.is_current() {
                *image.write() = Some(opened.clone());
                return Ok(opened);
            }
        }
        Err(fs_err(FsKind::Stale, node.path()))
    }

    /// Run `op` on the image of the point file open as `fh`. If the image stops being current
    /// (its checkpoint closed), the same point is opened again where it lives now and the
    /// handle keeps the new image; if the point is gone, `Fs{Stale}`.
    fn on_point<T>(
        &self,
        fh: u64,
        ino: u64,
        mut img: Arc<dyn ImageSource>,
        mut op: impl FnMut(&dyn ImageSource) -> Result<T>,
    ) -> Result<T> {
        for _ in 0..REOPEN_TRIES {
            if img.is_current() {
                match op(&*img) {
                    // Closed during the op: its result may not be the point's bytes.
                    Err(_) if !img.is_current() => {}
                    r => return r,
                }
            }
            let stale = || fs_err(FsKind::Stale, format!("handle {fh}"));
            let node = self.node(ino).map_err(|_| stale())?;
            img = self.image(&node).map_err(|_| stale())?;
            if let Some(Handle::Point(_, i)) = self.handles.write().get_mut(&fh) {
                *i = img.clone();
            }
        }
        Err(fs_err(FsKind::Stale, format!("handle {fh}")))
    }

    fn dir_attr(&self, ino: u64, nlink: u32) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            blocks: 0,
            perm: 0o755,
            nlink,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mounted,
        }
    }

    fn attr_of(&self, ino: u64, node: &Node) -> Result<Attr> {
        Ok(match node {
            Node::Root => self.dir_attr(ino, 3),
            Node::LiveDir | Node::PointDir { .. } => self.dir_attr(ino, 2),
            Node::Live { disk } => {
                let d = self.live(disk)?;
                let m = d.file().metadata().map_err(Error::io("stat", d.image()))?;
                // The image's own owner and mode: libvirt chowns a disk to the QEMU user
                // before starting a VM, and the kernel checks opens against these
                // (default_permissions).
                Attr {
                    ino,
                    kind: Kind::File,
                    size: d.size(),
                    blocks: m.blocks(),
                    perm: (m.mode() & 0o7777) as u16,
                    nlink: 1,
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: UNIX_EPOCH + Duration::new(m.mtime() as u64, m.mtime_nsec() as u32),
                }
            }
            Node::PointFile { size, .. } => {
                let img = self.image(node)?;
                Attr {
                    ino,
                    kind: Kind::File,
                    size: *size,
                    blocks: img.allocated_bytes().div_ceil(512),
                    perm: 0o400,
                    nlink: 1,
                    uid: self.uid,
                    gid: self.gid,
                    mtime: self.mounted,
                }
            }
        })
    }

    /// Find `name` in directory `parent`.
    ///
    /// # Errors
    /// `Fs{NotFound}` for a missing name, `Fs{NotDir}` when `parent` is a file.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        let node = self.node(parent)?;
        let missing = || fs_err(FsKind::NotFound, format!("{}/{name}", node.path()));
        let ino = match &*node {
            Node::Root if name == LIVE_DIR && self.engine.is_some() => LIVE_INO,
            Node::Root => {
                let list = self.refresh_points()?;
                let p = list.iter().find(|p| p.name == name).ok_or_else(missing)?;
                self.intern(Node::PointDir {
                    point: p.name.clone(),
                    id: p.id.clone(),
                })
            }
            Node::LiveDir => {
                let disk = disk_of(name).ok_or_else(missing)?;
                self.live(disk).map_err(|_| missing())?;
                self.intern(Node::Live {
                    disk: disk.to_string(),
                })
            }
            Node::PointDir { point, id } => {
                let disk = disk_of(name).ok_or_else(missing)?;
                let size = self
                    .point_disks(point, id)?
                    .into_iter()
                    .find(|(d, _)| d == disk)
                    .ok_or_else(missing)?
                    .1;
                self.intern(Node::point_file(point, id, disk, size))
            }
            _ => return Err(fs_err(FsKind::NotDir, node.path())),
        };
        self.getattr(ino)
    }

    /// # Errors
    /// `Fs{NotFound}` for an inode that vanished with its point.
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let node = self.node(ino)?;
        self.attr_of(ino, &node)
    }

    /// The entries of a directory, `.` and `..` first, listed fresh.
    ///
    /// # Errors
    /// `Fs{NotDir}` on a file; errors listing points.
    pub fn readdir(&self, ino: u64) -> Result<Vec<Entry>> {
        let node = self.node(ino)?;
        let dot = |name: &str, ino| Entry {
            ino,
            kind: Kind::Dir,
            name: name.to_string(),
        };
        let file = |ino, name: String| Entry {
            ino,
            kind: Kind::File,
            name,
        };
        let mut out = vec![dot(".", ino), dot("..", ROOT_INO)];
        match &*node {
            Node::Root => {
                if self.engine.is_some() {
                    out.push(dot(LIVE_DIR, LIVE_INO));
                }
                for p in self.refresh_points()? {
                    let ino = self.intern(Node::PointDir {
                        point: p.name.clone(),
                        id: p.id,
                    });
                    out.push(dot(&p.name, ino));
                }
            }
            Node::LiveDir => {
                for d in self.engine.iter().flat_map(|e| e.disks()) {
                    let disk = d.name().to_string();
                    let name = format!("{disk}{IMG}");
                    out.push(file(self.intern(Node::Live { disk }), name));
                }
            }
            Node::PointDir { point, id } => {
                for (disk, size) in self.point_disks(point, id)? {
                    let name = format!("{disk}{IMG}");
                    let ino = self.intern(Node::point_file(point, id, &disk, size));
                    out.push(file(ino, name));
                }
            }
            _ => return Err(fs_err(FsKind::NotDir, node.path())),
        }
        Ok(out)
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(fh, h);
        fh
    }

    /// Snapshot a directory listing for a sequence of `readdir_at` calls, so one `ls` sees
    /// one consistent listing even while points come and go.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let entries = self.readdir(ino)?;
        Ok(self.add_handle(Handle::Dir(Arc::new(entries))))
    }

    /// The snapshot entries from index `offset` on.
    pub fn readdir_at(&self, fh: u64, offset: u64) -> Result<Vec<Entry>> {
        match self.handles.read().get(&fh) {
            Some(Handle::Dir(e)) => Ok(e.iter().skip(offset as usize).cloned().collect()),
            _ => Err(fs_err(FsKind::BadHandle, format!("handle {fh}"))),
        }
    }

    /// Open a file. Point images refuse write access here, before any byte could change.
    ///
    /// # Errors
    /// `Fs{ReadOnly}` for write access to a point image; `Fs{IsDir}` on a directory.
    pub fn open(&self, ino: u64, write: bool) -> Result<(u64, Opened)> {
        let node = self.node(ino)?;
        match &*node {
            Node::Live { disk } => {
                let d = self.live(disk)?;
                Ok((self.add_handle(Handle::Live(d)), Opened::Live))
            }
            Node::PointFile { .. } if write => Err(fs_err(FsKind::ReadOnly, node.path())),
            Node::PointFile { .. } => {
                let img = self.image(&node)?;
                Ok((self.add_handle(Handle::Point(ino, img)), Opened::Point))
            }
            _ => Err(fs_err(FsKind::IsDir, node.path())),
        }
    }

    /// Forget an open file or directory handle.
    pub fn release(&self, fh: u64) {
        self.handles.write().remove(&fh);
    }

    fn file_handle(&self, fh: u64) -> Result<Handle> {
        match self.handles.read().get(&fh) {
            Some(Handle::Live(d)) => Ok(Handle::Live(d.clone())),
            Some(Handle::Point(ino, i)) => Ok(Handle::Point(*ino, i.clone())),
            _ => Err(fs_err(FsKind::BadHandle, format!("handle {fh}"))),
        }
    }

    /// Read into `buf`; short only at the end of the file.
    pub fn read(&self, fh: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_decoding(fh, off, buf, &mut Vec::new())
    }

    /// `read`, also pushing onto `decoded` the stored blocks a point read decoded whole for
    /// part of their bytes (`ImageSource::read_at_decoding`).
    ///
    /// # Errors
    /// As `read`.
    pub fn read_decoding(
        &self,
        fh: u64,
        off: u64,
        buf: &mut [u8],
        decoded: &mut Vec<Decoded>,
    ) -> Result<usize> {
        match self.file_handle(fh)? {
            Handle::Live(d) => d.read_at(buf, off),
            Handle::Point(ino, i) => {
                if off >= i.size() {
                    return Ok(0);
                }
                let n = buf.len().min((i.size() - off) as usize);
                self.on_point(fh, ino, i, |i| {
                    decoded.clear();
                    i.read_at_decoding(&mut buf[..n], off, decoded)
                })
            }
            Handle::Dir(_) => unreachable!("file_handle returns files only"),
        }
    }

    /// A tracked write to a live disk, acknowledged only once tracker and image have it.
    ///
    /// # Errors
    /// `Fs{ReadOnly}` on a point image; `OutOfRange` past the end of the disk.
    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<usize> {
        match self.file_handle(fh)? {
            Handle::Live(d) => d.write_at(data, off).map(|()| data.len()),
            _ => Err(fs_err(FsKind::ReadOnly, format!("handle {fh}"))),
        }
    }

    /// Make a live disk's data durable. Tracking state needs no fsync here: the tracker logs
    /// a block before the write that changes it is acknowledged.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        match self.file_handle(fh)? {
            Handle::Live(d) => d.sync_data(),
            _ => Ok(()),
        }
    }

    /// `lseek(SEEK_DATA/SEEK_HOLE)` so sparse-aware copies skip holes.
    ///
    /// # Errors
    /// `Fs{NoMoreData}` (ENXIO) at or past the end, or when no data follows for SEEK_DATA.
    pub fn lseek(&self, fh: u64, off: u64, whence: Whence) -> Result<u64> {
        let past = || fs_err(FsKind::NoMoreData, format!("offset {off}"));
        match self.file_handle(fh)? {
            Handle::Live(d) => {
                if off >= d.size() {
                    return Err(past());
                }
                let r =
                    crate::sys::seek_data_hole(d.file().as_raw_fd(), off, whence == Whence::Hole)
                        .map_err(Error::io("seek", d.image()))?;
                match (whence, r) {
                    (Whence::Data, Some(p)) if p < d.size() => Ok(p),
                    (Whence::Data, _) => Err(past()),
                    (Whence::Hole, p) => Ok(p.unwrap_or(d.size()).min(d.size())),
                }
            }
            Handle::Point(ino, i) => {
                if off >= i.size() {
                    return Err(past());
                }
                self.on_point(fh, ino, i, |i| match whence {
                    Whence::Data => i.next_data(off)?.ok_or_else(past),
                    Whence::Hole => Ok(i.next_hole(off)?.min(i.size())),
                })
            }
            Handle::Dir(_) => unreachable!("file_handle returns files only"),
        }
    }

    /// Attribute changes: none on points or directories; on a live disk a size equal to its
    /// own (so `truncate -s SAME` and `O_TRUNC` of nothing succeed), owner and mode (applied to
    /// the image), and times, ignored.
    ///
    /// # Errors
    /// `Fs{ReadOnly}` on points and directories, `Fs{NoResize}` for a size change; the
    /// image's chown or chmod failing.
    pub fn setattr(&self, ino: u64, set: SetAttr) -> Result<Attr> {
        let node = self.node(ino)?;
        let attr = self.attr_of(ino, &node)?;
        if set == SetAttr::default() {
            return Ok(attr);
        }
        match &*node {
            Node::Live { .. } => {
                if set.size.is_some_and(|s| s != attr.size) {
                    return Err(fs_err(FsKind::NoResize, node.path()));
                }
                // Owner and mode pass through to the image, as on a passthrough filesystem.
                // The kernel has already checked the caller's right to change them against
                // the attributes above (default_permissions), so the daemon applies them.
                let Node::Live { disk } = &*node else {
                    unreachable!("matched above")
                };
                if set.uid.is_some() || set.gid.is_some() || set.mode.is_some() {
                    self.live(disk)?
                        .set_owner_mode(set.uid, set.gid, set.mode)?;
                }
                self.attr_of(ino, &node)
            }
            _ => Err(fs_err(FsKind::ReadOnly, node.path())),
        }
    }

    /// Every request that would add, remove or rename a name is refused: the layout is the
    /// store's, not the user's.
    pub fn refuse_change(&self, parent: u64, name: &str) -> Error {
        let path = match self.node(parent) {
            Ok(n) => format!("{}/{name}", n.path().trim_end_matches('/')),
            Err(e) => return e,
        };
        fs_err(FsKind::ReadOnly, path)
    }

    /// Extended attributes: only the root has one, the store's name. Files and directories
    /// below it support none and say so (EOPNOTSUPP, not ENODATA), as a filesystem without
    /// xattrs does: libvirt's `remember_owner` then skips keeping the disk's owner in xattrs,
    /// where an ENODATA would have it try to set one and refuse to start the VM.
    pub fn getxattr(&self, ino: u64, name: &str) -> Result<Vec<u8>> {
        if ino == ROOT_INO {
            if let (STORE_XATTR, Some(root)) = (name, self.store_root()) {
                use std::os::unix::ffi::OsStrExt;
                return Ok(root.as_os_str().as_bytes().to_vec());
            }
            return Err(fs_err(FsKind::NoAttr, name.to_string()));
        }
        Err(fs_err(FsKind::Unsupported, format!("xattr {name}")))
    }

    /// Why setting or removing an xattr fails: a live disk supports none (see `getxattr`);
    /// everything else is the store's layout, read-only.
    pub fn xattr_change_error(&self, ino: u64, name: &str) -> Error {
        match self.node(ino) {
            Ok(n) if matches!(*n, Node::Live { .. }) => {
                fs_err(FsKind::Unsupported, format!("xattr {name}"))
            }
            Ok(_) => self.refuse_change(ino, ""),
            Err(e) => e,
        }
    }

    /// The store this filesystem serves, if it serves one.
    pub fn store_root(&self) -> Option<PathBuf> {
        self.engine.as_ref().map(|e| e.store().root().to_path_buf())
    }
}
