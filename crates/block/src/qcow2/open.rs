//! Opening and creating qcow2 images: the header and tables read and
//! checked, the backing chain followed as the caller's policy says, new
//! images written (and preallocated).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use super::*;
use crate::file::{open_checked, Kind};
use crate::lock::Permissions;
use crate::{io_err, BackingPolicy, BlockBackend, Error, Format, ImageFile, ImageOptions, Result};

impl Qcow2Image {
    /// Opens `path`; `read_only` opens the file (and its backing chain)
    /// O_RDONLY. Locks as QEMU does; the backing file's format must be
    /// recorded in the image.
    ///
    /// A read-write open of an image left dirty by lazy refcounts rebuilds
    /// its refcounts first, as QEMU does.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_with(path, &ImageOptions { read_only, ..ImageOptions::default() })
    }

    /// Opens `path` as `opts` say (locking, where the backing chain comes from).
    pub fn open_with(path: &Path, opts: &ImageOptions) -> Result<Self> {
        Self::open_in_chain(path, opts, false, &mut HashSet::new())
    }

    fn open_in_chain(path: &Path, opts: &ImageOptions, as_backing: bool, chain: &mut HashSet<PathBuf>) -> Result<Self> {
        enter_chain(chain, path)?;
        let read_only = opts.read_only || as_backing;
        let file = Self::open_locked(path, opts, as_backing)?;
        Self::from_file(file, path, read_only, opts, chain, false)
    }

    /// Opens `path` read-write, alone, for `check -r all`: an image marked
    /// corrupt, or whose refcount table points outside the file, opens
    /// (its refcount structures are then rebuilt by the repair).
    pub fn open_for_repair(path: &Path, locking: crate::Locking) -> Result<Self> {
        let opts = ImageOptions { read_only: false, locking, backing: BackingPolicy::Ignore, direct: false };
        let file = Self::open_locked(path, &opts, false)?;
        Self::from_file(file, path, false, &opts, &mut HashSet::new(), true)
    }

    /// The file of an image, opened and locked as `opts` say.
    fn open_locked(path: &Path, opts: &ImageOptions, as_backing: bool) -> Result<Box<dyn ImageFile>> {
        let read_only = opts.read_only || as_backing;
        // cache=none covers the image the guest writes; backing files are read through the page cache.
        let direct = opts.direct && !as_backing;
        let file = open_checked(path, !read_only, Kind::Regular, if direct { libc::O_DIRECT } else { 0 }).map_err(|e| {
            let e = if direct { std::io::Error::new(e.kind(), format!("O_DIRECT: {e}")) } else { e };
            io_err(path, e)
        })?;
        let perms = if as_backing { Permissions::for_backing(opts.locking) } else { Permissions::for_image(read_only, true, opts.locking) };
        crate::lock::lock(&file, path, perms)?;
        Ok(if direct { Box::new(crate::direct::DirectFile::new(file)) } else { Box::new(file) })
    }

    /// Opens an image over any [`ImageFile`] (the power-loss tests use a
    /// recording one). `backing` is the image's backing file, already open.
    #[doc(hidden)]
    pub fn open_file(file: Box<dyn ImageFile>, name: &str, read_only: bool, backing: Option<Box<dyn BlockBackend>>) -> Result<Self> {
        let opts = ImageOptions { read_only, backing: BackingPolicy::Ignore, ..ImageOptions::default() };
        let mut img = Self::from_file(file, Path::new(name), read_only, &opts, &mut HashSet::new(), false)?;
        img.backing = backing;
        Ok(img)
    }

    fn from_file(file: Box<dyn ImageFile>, path: &Path, read_only: bool, opts: &ImageOptions, chain: &mut HashSet<PathBuf>, repair: bool) -> Result<Self> {
        let name = path.display().to_string();
        let (file_len, header, HeaderCluster { backing_name, backing_format, backing_format_unknown, extensions }) = read_header(file.as_ref(), path)?;
        let cs = header.cluster_size();
        let corrupt = |d: &str| Error::Corrupt { path: name.clone(), detail: d.into() };
        if !read_only && !repair && header.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt("image is marked corrupt; open it read-only or repair it"));
        }
        let (data_file_name, data_file) = Self::open_data_file(path, &header, &extensions, read_only, opts)?;
        let extended_l2 = header.incompatible_features & INCOMPAT_EXTENDED_L2 != 0;
        let backing = match &backing_name {
            Some(_) if matches!(opts.backing, BackingPolicy::RecordedFormat | BackingPolicy::Probe) && backing_format_unknown.is_some() => {
                let f = backing_format_unknown.unwrap_or_default();
                return Err(Error::Unsupported { path: name, detail: format!("backing format '{f}'") });
            }
            Some(bname) => Self::open_backing(path, bname, backing_format, opts, chain)?,
            None if matches!(&opts.backing, BackingPolicy::Given(l) if !l.is_empty()) => {
                return Err(Error::Request(format!("{name}: a backing chain was given, but the image has no backing file")));
            }
            None => None,
        };
        let l1 = read_table(file.as_ref(), header.l1_table_offset, header.l1_size as usize).map_err(|e| io_err(path, e))?;
        // Reads need neither refcounts nor snapshots: a read-only open goes on
        // without what is damaged there (with a warning the caller shows), and
        // a repair rebuilds the refcounts. A writer must have both.
        let tolerant = read_only || repair;
        let mut refcount_damage = Vec::new();
        let mut reftable = Vec::new();
        match header.refcount_table_problem(file_len) {
            Some(p) if tolerant => refcount_damage.push(p),
            Some(p) => return Err(corrupt(&p)),
            None => {
                let rt_entries = (u64::from(header.refcount_table_clusters) * cs / 8) as usize;
                reftable = read_table(file.as_ref(), header.refcount_table_offset, rt_entries).map_err(|e| io_err(path, e))?;
                for (i, rb) in reftable.iter_mut().enumerate() {
                    *rb &= REFT_OFFSET_MASK;
                    if *rb != 0 && (*rb % cs != 0 || *rb < cs || rb.checked_add(cs).is_none_or(|end| end > file_len)) {
                        let p = format!("refcount block {i} at {:#x} is outside the file or misaligned", *rb);
                        if !tolerant {
                            return Err(corrupt(&p));
                        }
                        refcount_damage.push(p);
                        *rb = 0;
                    }
                }
            }
        }
        let mut snapshot_damage = None;
        let snapshots = match snapshot::read_snapshot_table(file.as_ref(), &header, file_len, &name) {
            Ok(s) => s,
            Err(e) if tolerant => {
                snapshot_damage = Some(format!("snapshot table: {e}; the snapshots are left out"));
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let bitmap_ext = extensions.iter().find(|(t, _)| *t == bitmap::EXT_BITMAPS).map(|(_, d)| d.as_slice());
        let consistent = header.autoclear_features & bitmap::AUTOCLEAR_BITMAPS != 0;
        let bitmaps = bitmap::Bitmaps::read(file.as_ref(), bitmap_ext, consistent, cs, file_len, header.size);
        let dirty = header.incompatible_features & INCOMPAT_DIRTY != 0;
        let lazy_refcounts = !read_only && header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
        let img = Self {
            path: path.to_path_buf(),
            name,
            cluster_bits: header.cluster_bits,
            extended_l2,
            data_file,
            data_file_name,
            file,
            backing,
            backing_name,
            backing_format,
            backing_format_unknown,
            read_only,
            lazy_refcounts,
            no_sync: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                l1,
                l2_cache: HashMap::new(),
                l2_lru: Vec::new(),
                l2_dirty: HashSet::new(),
                pending_free: Vec::new(),
                reftable,
                rc_cache: HashMap::new(),
                rc_lru: Vec::new(),
                rc_dirty: HashSet::new(),
                snapshots,
                next_free: file_len.next_multiple_of(cs),
                free_hint: 0,
                file_len,
                compressed_cursor: 0,
                marked_dirty: dirty,
                header,
                extensions,
                bitmaps,
                refcount_damage,
                snapshot_damage,
            }),
        };
        if dirty && !read_only {
            // Refcounts may be stale after a crash with lazy refcounts.
            img.check(check::Repair::All)?;
            img.set_dirty(false)?;
        }
        if !read_only {
            let mut inner = img.lock();
            img.open_bitmaps(&mut inner)?;
        }
        Ok(img)
    }

    /// The external data file an image records, opened (and locked) as the
    /// image is. A read-only header-only open (`BackingPolicy::Ignore`) goes
    /// on without it when it cannot be opened.
    #[allow(clippy::type_complexity)]
    fn open_data_file(
        path: &Path,
        header: &Header,
        extensions: &[(u32, Vec<u8>)],
        read_only: bool,
        opts: &ImageOptions,
    ) -> Result<(Option<String>, Option<Box<dyn ImageFile>>)> {
        let unsupported = |d: String| Error::Unsupported { path: path.display().to_string(), detail: d };
        if header.incompatible_features & INCOMPAT_EXTERNAL_DATA == 0 {
            return Ok((None, None));
        }
        let Some((_, raw)) = extensions.iter().find(|(t, _)| *t == EXT_DATA_FILE) else {
            return Err(Error::Corrupt { path: path.display().to_string(), detail: "external data file feature set but no data file named".into() });
        };
        let name = String::from_utf8_lossy(raw).trim_end_matches('\0').to_string();
        if name.starts_with("json:") {
            return Err(unsupported("the data file name is a json: pseudo-name".into()));
        }
        if matches!(opts.backing, BackingPolicy::Given(_)) {
            // Whoever resolved the chain (rvirtd) opens no file by a name read from an image.
            return Err(unsupported(format!("external data file '{name}': images whose chain is given cannot name more files")));
        }
        // qemu-img resolves a relative data file name from the current
        // directory (not the image's, as for backing files); so do we.
        let dpath = PathBuf::from(&name);
        if !read_only {
            // Written only beside the image: an image from elsewhere cannot
            // make a writer change (or truncate) a host file it names.
            let dir = |p: &Path| std::fs::canonicalize(p).ok().and_then(|c| c.parent().map(Path::to_path_buf));
            if dir(&dpath).is_none() || dir(&dpath) != dir(path) {
                return Err(unsupported(format!(
                    "external data file '{name}' is not in the image's directory; such an image is opened read-only only"
                )));
            }
        }
        match open_checked(&dpath, !read_only, Kind::Regular, 0) {
            Ok(f) => {
                // Locked as the image is: nobody else writes the guest's data underneath.
                crate::lock::lock(&f, &dpath, Permissions::for_image(read_only, true, opts.locking))?;
                Ok((Some(name), Some(Box::new(f))))
            }
            Err(_) if read_only && opts.backing == BackingPolicy::Ignore => Ok((Some(name), None)),
            Err(e) => Err(io_err(&dpath, e)),
        }
    }

    /// Opens the backing file `bname` of the image at `path` as `opts.backing` says.
    fn open_backing(
        path: &Path,
        bname: &str,
        recorded: Option<Format>,
        opts: &ImageOptions,
        chain: &mut HashSet<PathBuf>,
    ) -> Result<Option<Box<dyn BlockBackend>>> {
        let (bpath, fmt, below) = match &opts.backing {
            BackingPolicy::Ignore => return Ok(None),
            BackingPolicy::Given(layers) => {
                let Some((first, rest)) = layers.split_first() else {
                    return Err(Error::Request(format!(
                        "{}: the image names backing file '{bname}', but no backing chain was given",
                        path.display()
                    )));
                };
                (first.path.clone(), first.format, BackingPolicy::Given(rest.to_vec()))
            }
            policy => {
                let bpath = resolve_backing(path, bname);
                let fmt = backing_format_for(path, bname, &bpath, recorded, policy)?;
                (bpath, fmt, policy.clone())
            }
        };
        let sub = ImageOptions { read_only: true, locking: opts.locking, backing: below, direct: false };
        let b: Box<dyn BlockBackend> = match fmt {
            Format::Raw => {
                if matches!(&sub.backing, BackingPolicy::Given(l) if !l.is_empty()) {
                    return Err(Error::Request(format!("{}: a raw backing file has no backing file of its own", bpath.display())));
                }
                Box::new(crate::RawImage::open_backing(&bpath, opts.locking).map_err(|e| backing_err(path, e))?)
            }
            Format::Qcow2 => Box::new(Self::open_in_chain(&bpath, &sub, true, chain)?),
        };
        Ok(Some(b))
    }

    /// Creates a new, empty image of `size` bytes.
    pub fn create(path: &Path, size: u64, opts: &CreateOptions) -> Result<Self> {
        if let Some((name, _)) = &opts.data_file {
            if opts.version < 3 {
                return Err(Error::Request("data-file is only supported with compat level 1.1 or above".into()));
            }
            if opts.backing.is_some() {
                return Err(Error::Request("rvirt-img does not create images with both a backing file and an external data file".into()));
            }
            // Created (or truncated) where qemu-img puts it: the name from the current directory.
            let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(name).map_err(|e| io_err(Path::new(name), e))?;
            f.set_len(size).map_err(|e| io_err(Path::new(name), e))?;
        }
        let file = Self::write_new(path, size, opts)?;
        let img = Self::from_file(Box::new(file), path, false, &ImageOptions::default(), &mut HashSet::new(), false)?;
        if let Some((_, true)) = &opts.data_file {
            // data_file_raw: every cluster maps to its own offset, so the data file reads as the disk.
            img.map_data_file_whole()?;
        } else if opts.preallocation != Preallocation::Off {
            img.preallocate(opts.preallocation)?;
        }
        Ok(img)
    }

    /// Points every guest cluster at its own offset in the data file.
    fn map_data_file_whole(&self) -> Result<()> {
        let cs = self.cluster_size();
        let mut inner = self.lock();
        for gc in 0..inner.header.size.div_ceil(cs) {
            let l2 = self.writable_l2(&mut inner, gc)?;
            self.set_l2_entry(&mut inner, l2, gc, (gc * cs) | COPIED)?;
        }
        self.commit(&mut inner)
    }

    /// Writes a new, empty image without opening its backing file: an
    /// overlay for a running VM's image, whose writer holds its lock
    /// (the VM opens the overlay over the image it already has).
    pub fn create_unopened(path: &Path, size: u64, opts: &CreateOptions) -> Result<()> {
        if opts.preallocation != Preallocation::Off {
            return Err(Error::Request("an image created without being opened cannot be preallocated".into()));
        }
        Self::write_new(path, size, opts).map(drop)
    }

    /// Writes the header, refcount structures and L1 table of a new image
    /// and returns the file, locked and synced.
    fn write_new(path: &Path, size: u64, opts: &CreateOptions) -> Result<std::fs::File> {
        let name = path.display().to_string();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&opts.cluster_bits) {
            return Err(Error::Request(format!(
                "cluster size must be a power of two between {} and {} bytes",
                1 << MIN_CLUSTER_BITS,
                1 << MAX_CLUSTER_BITS
            )));
        }
        if opts.version != 2 && opts.version != 3 {
            return Err(Error::Request(format!("qcow2 version {} (compat) is not 2 or 3", opts.version)));
        }
        if opts.version == 2 && (opts.lazy_refcounts || opts.compression != Compression::Zlib) {
            return Err(Error::Request("lazy refcounts and zstd compression need compat=1.1 (version 3)".into()));
        }
        if opts.extended_l2 && opts.version < 3 {
            return Err(Error::Request("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into()));
        }
        if opts.extended_l2 && opts.cluster_bits < 14 {
            return Err(Error::Request("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes".into()));
        }
        let cs = 1u64 << opts.cluster_bits;
        let l2_entries = cs / if opts.extended_l2 { 16 } else { 8 };
        let l1_size = size.div_ceil(cs * l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::Request(format!("size {size} is too large for {cs}-byte clusters")));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let zstd = opts.compression == Compression::Zstd;
        let header_length = match (opts.version, zstd) {
            (3, true) => V3_HEADER_LEN + 8,
            (3, false) => V3_HEADER_LEN,
            _ => V2_HEADER_LEN,
        };
        let mut h = Header {
            version: opts.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: opts.cluster_bits,
            size,
            crypt_method: 0,
            l1_size: l1_size as u32,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: if zstd { INCOMPAT_COMPRESSION } else { 0 }
                | if opts.data_file.is_some() { INCOMPAT_EXTERNAL_DATA } else { 0 }
                | if opts.extended_l2 { INCOMPAT_EXTENDED_L2 } else { 0 },
            compatible_features: if opts.lazy_refcounts { COMPAT_LAZY_REFCOUNTS } else { 0 },
            autoclear_features: if matches!(opts.data_file, Some((_, true))) { AUTOCLEAR_DATA_FILE_RAW } else { 0 },
            refcount_order: 4,
            header_length,
            compression: opts.compression,
        };
        let backing = opts.backing.as_ref().map(|(n, f)| (n.as_str(), Some(*f)));
        let exts: Vec<(u32, Vec<u8>)> = opts.data_file.iter().map(|(n, _)| (EXT_DATA_FILE, n.as_bytes().to_vec())).collect();
        let cluster0 = build_header_cluster(&mut h, backing, &exts)?;
        if cluster0.len() as u64 > cs {
            return Err(Error::Request("backing file name does not fit in the header cluster".into()));
        }
        // Header, refcount table, refcount block, L1: all counted by the one
        // refcount block (16-bit entries). Refuse before touching the file.
        let total_clusters = 3 + l1_clusters;
        if total_clusters > cs / 2 {
            return Err(Error::Request("image metadata does not fit one refcount block; use larger clusters".into()));
        }
        let file = crate::file::create_locked(path)?;
        let io = |e| Error::Io { path: name.clone(), source: e };
        file.set_len(total_clusters * cs).map_err(io)?;
        file.write_all_at(&cluster0, 0).map_err(io)?;
        // Refcount table -> the one refcount block in cluster 2.
        file.write_all_at(&(2 * cs).to_be_bytes(), cs).map_err(io)?;
        let mut block = Vec::with_capacity(total_clusters as usize * 2);
        for _ in 0..total_clusters {
            block.extend_from_slice(&1u16.to_be_bytes());
        }
        file.write_all_at(&block, 2 * cs).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(file)
    }

    /// Allocates every L2 table and data cluster (metadata preallocation),
    /// then reserves or zero-fills the data as `mode` asks.
    fn preallocate(&self, mode: Preallocation) -> Result<()> {
        self.preallocate_from(mode, 0)
    }

    /// Preallocates the clusters from guest offset `from` on (whole clusters
    /// past it; the cluster holding `from` keeps what it has): what
    /// `resize --preallocation` does for the area it adds.
    pub fn preallocate_from(&self, mode: Preallocation, from: u64) -> Result<()> {
        self.writable()?;
        if mode == Preallocation::Off {
            return Ok(());
        }
        let cs = self.cluster_size();
        let mut inner = self.lock();
        let clusters = inner.header.size.div_ceil(cs);
        let zeros = vec![0u8; cs as usize];
        for gc in from.div_ceil(cs)..clusters {
            if matches!(self.mapping(&mut inner, gc)?, Mapping::Data { .. }) {
                continue;
            }
            let l2 = self.writable_l2(&mut inner, gc)?;
            let host = self.alloc_clusters(&mut inner, 1)?;
            if host < inner.file_len {
                // A freed cluster inside the file still holds old data.
                self.file.write_all_at(&zeros, host).map_err(|e| self.io(e))?;
            }
            if self.extended_l2 {
                // As qemu makes them: the host cluster kept, no subcluster
                // allocated yet (reads fall through, writes fill it in place).
                self.set_l2_extended(&mut inner, l2, gc, host | COPIED, 0)?;
            } else {
                self.set_l2_entry(&mut inner, l2, gc, host | COPIED)?;
            }
        }
        let end = inner.next_free;
        match mode {
            Preallocation::Off | Preallocation::Metadata => self.file.set_len(end).map_err(|e| self.io(e))?,
            Preallocation::Falloc => self.file.allocate(0, end).map_err(|e| self.io(e))?,
            // Zero-fill the whole file past what is already written.
            Preallocation::Full => crate::write_zeros(self.file.as_ref(), inner.file_len, end).map_err(|e| self.io(e))?,
        }
        inner.file_len = inner.file_len.max(end);
        self.commit(&mut inner)
    }
}
