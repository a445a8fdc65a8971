//! `rvirt-img`: create, inspect, check, convert and change disk images
//! (qemu-img's command names and flags).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rvirt_img::*;

/// Create, inspect, check, convert and change raw and qcow2 disk images.
#[derive(Parser)]
#[command(name = "rvirt-img", version, about)]
struct Cli {
    /// Force share: read an image another process holds (read-only commands; the view may be inconsistent).
    #[arg(short = 'U', long = "force-share", global = true)]
    force_share: bool,
    /// Guess the format of backing files whose format the image does not record
    /// (unsafe if a guest could have written the backing file).
    #[arg(long = "probe-backing", global = true)]
    probe_backing: bool,
    /// Image names are option strings: driver=raw|qcow2,file.filename=PATH (qemu-img's --image-opts).
    #[arg(long = "image-opts", global = true)]
    image_opts: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an image: rvirt-img create [-f FMT] [-b BACKING [-F FMT]] [-o OPTS] FILE [SIZE]
    Create {
        /// Format: raw (default) or qcow2.
        #[arg(short = 'f')]
        format: Option<String>,
        /// Backing file (stored as given; relative to the new image's directory).
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Unsafe: record the backing file without opening it (needs -F and a size).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        /// Options: size=, backing_file=, backing_fmt=, cluster_size=, compat=, compression_type=zlib|zstd,
        /// lazy_refcounts=on|off, preallocation=off|metadata|falloc|full, refcount_bits=, extended_l2=on|off ("help" lists them).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// The image to create (not needed with -o help).
        filename: Option<PathBuf>,
        /// Virtual size, e.g. 10G (defaults to the backing file's size).
        size: Option<String>,
    },
    /// Copy an image, possibly to another format: rvirt-img convert [-f FMT] [-O FMT] [-o OPTS] [-p] SRC DST
    Convert {
        /// Source format (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Destination format: raw (default) or qcow2.
        #[arg(short = 'O')]
        output_format: Option<String>,
        /// Destination options, as for create.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Destination cache mode: unsafe (default, no final flush), writeback, none, writethrough, directsync.
        #[arg(short = 't', default_value = "unsafe")]
        cache: String,
        /// Write compressed clusters (qcow2 destination).
        #[arg(short = 'c')]
        compress: bool,
        /// Parallel copy workers, 1 to 16 (qemu-img's -m).
        #[arg(short = 'm', default_value_t = 8)]
        workers: usize,
        /// Copy the persistent bitmaps too (qcow2 to qcow2).
        #[arg(long)]
        bitmaps: bool,
        /// With --bitmaps, leave out inconsistent bitmaps instead of failing.
        #[arg(long = "skip-broken-bitmaps")]
        skip_broken_bitmaps: bool,
        /// Write into DST as it exists (not created; -O still gives its format).
        #[arg(short = 'n')]
        existing: bool,
        /// With -n: DST already reads as zeros, so zeros are not written.
        #[arg(long = "target-is-zero")]
        target_is_zero: bool,
        /// Backing file of the new image: only what SRC's own top layer stores is copied.
        #[arg(short = 'B')]
        backing: Option<String>,
        /// Format of -B's backing file.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Smallest run of zeros left unallocated (multiple of 512; 0 allocates everything).
        #[arg(short = 'S')]
        sparse_size: Option<String>,
        /// Allow out-of-order writes (a qcow2 destination written by every worker).
        #[arg(short = 'W')]
        out_of_order: bool,
        /// Copy an internal snapshot of SRC: NAME, or snapshot.id=ID / snapshot.name=NAME.
        #[arg(short = 'l')]
        snapshot_param: Option<String>,
        /// Copy the internal snapshot with this id or name (older form of -l).
        #[arg(short = 's')]
        snapshot_id: Option<String>,
        /// Copy at most this many bytes per second (e.g. 10M).
        #[arg(short = 'r')]
        rate_limit: Option<String>,
        /// Source image.
        source: PathBuf,
        /// Destination image.
        dest: PathBuf,
    },
    /// Show an image's format, sizes, snapshots and backing file.
    Info {
        /// Format (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// human (default) or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// Also show every backing file below the image.
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        /// The image.
        filename: PathBuf,
    },
    /// Check a qcow2 image's metadata: rvirt-img check [-r leaks|all] [--output json] FILE.
    /// Exit code 0: clean, 2: corruptions, 3: leaked clusters only.
    Check {
        /// Format (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Repair: leaks, or all.
        #[arg(short = 'r')]
        repair: Option<String>,
        /// human (default) or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// The image.
        filename: PathBuf,
    },
    /// Change the virtual size: rvirt-img resize [--shrink] FILE [+|-]SIZE.
    Resize {
        /// Format (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Allow making the image smaller (data past the new end is lost).
        #[arg(long)]
        shrink: bool,
        /// Preallocate the area a growth adds: off, metadata (qcow2), falloc, full.
        #[arg(long)]
        preallocation: Option<String>,
        /// The image.
        filename: PathBuf,
        /// New size, or +SIZE / -SIZE relative to the current one.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Internal snapshots: rvirt-img snapshot -l | -c NAME | -a NAME | -d NAME FILE.
    Snapshot {
        /// List snapshots.
        #[arg(short = 'l')]
        list: bool,
        /// Create a snapshot.
        #[arg(short = 'c')]
        create: Option<String>,
        /// Revert the disk to a snapshot.
        #[arg(short = 'a')]
        apply: Option<String>,
        /// Delete a snapshot.
        #[arg(short = 'd')]
        delete: Option<String>,
        /// The image.
        filename: PathBuf,
    },
    /// Change the backing file: rvirt-img rebase [-u] -b BACKING [-F FMT] FILE.
    /// Without -u, data that differs between the old and new backing is copied in first.
    Rebase {
        /// Format of FILE (qcow2).
        #[arg(short = 'f')]
        format: Option<String>,
        /// New backing file ("" removes it).
        #[arg(short = 'b')]
        backing: String,
        /// New backing file's format (probed when omitted).
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Unsafe: only rewrite the header.
        #[arg(short = 'u')]
        unsafe_mode: bool,
        /// The image.
        filename: PathBuf,
    },
    /// Write an image's data into its backing file: rvirt-img commit [-d] [-b BASE] FILE.
    Commit {
        /// Format of FILE (qcow2).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Keep FILE's data instead of emptying it.
        #[arg(short = 'd')]
        keep: bool,
        /// Commit into this image of the backing chain (the layers in between too); implies -d.
        #[arg(short = 'b')]
        base: Option<PathBuf>,
        /// The image.
        filename: PathBuf,
    },
    /// Compare two images' contents: exit 0 identical, 1 different, 2 error.
    Compare {
        /// Format of the first image.
        #[arg(short = 'f')]
        format: Option<String>,
        /// Format of the second image.
        #[arg(short = 'F')]
        format2: Option<String>,
        /// Strict: sizes and allocation must match too.
        #[arg(short = 's')]
        strict: bool,
        /// First image.
        first: PathBuf,
        /// Second image.
        second: PathBuf,
    },
    /// Show where each range of the image is stored.
    Map {
        /// Format (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// human (default) or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// The image.
        filename: PathBuf,
    },
    /// Persistent dirty bitmaps of a qcow2 image: rvirt-img bitmap (--add | --remove | --clear | --enable |
    /// --disable | --merge SOURCE)... [-g GRANULARITY] [-b SOURCE_FILE [-F FMT]] FILE BITMAP. Steps run in the order given.
    Bitmap {
        /// Add an empty, enabled bitmap.
        #[arg(long)]
        add: bool,
        /// Remove the bitmap.
        #[arg(long)]
        remove: bool,
        /// Clear every bit.
        #[arg(long)]
        clear: bool,
        /// Record writes.
        #[arg(long)]
        enable: bool,
        /// Stop recording writes.
        #[arg(long)]
        disable: bool,
        /// Set every bit bitmap SOURCE has set (in -b's image, else this one).
        #[arg(long)]
        merge: Vec<String>,
        /// Granularity of an added bitmap (512 B to 2 GiB, a power of two).
        #[arg(short = 'g')]
        granularity: Option<String>,
        /// Image holding --merge's source bitmap.
        #[arg(short = 'b')]
        source_file: Option<PathBuf>,
        /// Format of -b's image.
        #[arg(short = 'F')]
        source_format: Option<String>,
        /// Format of FILE.
        #[arg(short = 'f')]
        format: Option<String>,
        /// The image.
        filename: PathBuf,
        /// The bitmap.
        bitmap: String,
    },
    /// Change a qcow2 image's options in place: rvirt-img amend -o compat=0.10|1.1,lazy_refcounts=on|off,
    /// refcount_bits=N,backing_file=F,backing_fmt=FMT,size=SIZE FILE (-o help lists them).
    Amend {
        /// Format of FILE (qcow2).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Options to change (key=value, comma separated; "help" lists them).
        #[arg(short = 'o', required = true)]
        options: Vec<String>,
        /// Accepted for qemu-img's command lines (changes that need it are refused or safe here).
        #[arg(long)]
        force: bool,
        /// Accepted for qemu-img's command lines (no progress is shown).
        #[arg(short = 'p')]
        progress: bool,
        /// Accepted for qemu-img's command lines.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image.
        filename: PathBuf,
    },
    /// Copy part of an image into a new one: rvirt-img dd [-f FMT] [-O FMT] [bs=N] [count=N] [skip=N] if=IN of=OUT.
    Dd {
        /// Input format (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: raw (default) or qcow2.
        #[arg(short = 'O')]
        output_format: Option<String>,
        /// bs=, count=, skip=, if=, of=.
        operands: Vec<String>,
    },
    /// Time reads or writes through the image: rvirt-img bench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP]
    /// [-o OFFSET] [-w [--pattern=N] [--flush-interval=N]] [-n] [-t CACHE] FILE.
    Bench {
        /// Requests in all.
        #[arg(short = 'c', default_value_t = 75_000)]
        count: u64,
        /// Requests in flight (one thread each, at most 64).
        #[arg(short = 'd', default_value_t = 64)]
        depth: u64,
        /// Format (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// A flush after every N requests (writes only).
        #[arg(long = "flush-interval")]
        flush_interval: Option<u64>,
        /// AIO mode (accepted for qemu-img's command lines; the library does its own I/O).
        #[arg(short = 'i')]
        aio: Option<String>,
        /// Bypass the host page cache (O_DIRECT).
        #[arg(short = 'n')]
        nocache: bool,
        /// Accepted for qemu-img's command lines.
        #[arg(long = "no-drain")]
        no_drain: bool,
        /// Where the first request starts.
        #[arg(short = 'o')]
        offset: Option<String>,
        /// The byte written (-w).
        #[arg(long)]
        pattern: Option<u8>,
        /// Print nothing.
        #[arg(short = 'q')]
        quiet: bool,
        /// Bytes per request.
        #[arg(short = 's')]
        size: Option<String>,
        /// Bytes between the starts of consecutive requests (the request size by default).
        #[arg(short = 'S')]
        step: Option<String>,
        /// Cache mode: none and directsync bypass the page cache.
        #[arg(short = 't')]
        cache: Option<String>,
        /// Write instead of read.
        #[arg(short = 'w')]
        write: bool,
        /// The image.
        filename: PathBuf,
    },
    /// How large a new image (--size) or a converted one (FILE) would be.
    Measure {
        /// Output format: raw or qcow2.
        #[arg(short = 'O', default_value = "raw")]
        output_format: String,
        /// Options for the output format (cluster_size=).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Virtual size of a new image.
        #[arg(long)]
        size: Option<String>,
        /// Source image format.
        #[arg(short = 'f')]
        format: Option<String>,
        /// human (default) or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// Source image.
        filename: Option<PathBuf>,
    },
}

fn output_json(output: &str) -> anyhow::Result<bool> {
    match output {
        "json" => Ok(true),
        "human" => Ok(false),
        other => anyhow::bail!("invalid --output '{other}': expected human or json"),
    }
}

/// Runs one command; returns the process exit code.
fn run(cli: Cli) -> anyhow::Result<u8> {
    set_force_share(cli.force_share);
    set_probe_backing(cli.probe_backing);
    set_image_opts(cli.image_opts);
    match cli.command {
        Cmd::Create { format, backing, backing_format, unsafe_backing, options, filename, size } => {
            if options.iter().flat_map(|o| o.split(',')).any(|o| o == "help" || o == "?") {
                match format.as_deref() {
                    Some("qcow2") => print!("{CREATE_HELP}"),
                    _ => print!("Supported raw options:\n  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)\n  size=<size>            - Virtual disk size\n"),
                }
                return Ok(0);
            }
            let Some(path) = filename else { anyhow::bail!("Expecting image file name") };
            let size = size.as_deref().map(parse_size).transpose()?;
            create(&CreateRequest { path, format, size, backing_file: backing, backing_format, options, unsafe_backing })?;
        }
        Cmd::Convert {
            format,
            output_format,
            options,
            progress,
            cache,
            compress,
            workers,
            bitmaps,
            skip_broken_bitmaps,
            existing,
            target_is_zero,
            backing,
            backing_format,
            sparse_size,
            out_of_order,
            snapshot_param,
            snapshot_id,
            rate_limit,
            source,
            dest,
        } => {
            let (source, format) = image_arg(source, format)?;
            let flush = cache_mode_flushes(&cache)?;
            if !(1..=16).contains(&workers) {
                anyhow::bail!("-m must be between 1 and 16");
            }
            convert(&ConvertRequest {
                source,
                source_format: format,
                dest,
                dest_format: output_format,
                options,
                progress,
                flush,
                compress,
                workers,
                bitmaps,
                skip_broken_bitmaps,
                existing_target: existing,
                target_is_zero,
                backing,
                backing_format,
                sparse_size: sparse_size.as_deref().map(parse_size).transpose()?,
                out_of_order,
                snapshot: snapshot_arg(snapshot_param.as_deref(), snapshot_id)?,
                rate_limit: rate_limit.as_deref().map(parse_size).transpose()?,
            })?;
        }
        Cmd::Info { format, output, backing_chain, filename } => {
            let (filename, format) = image_arg(filename, format)?;
            let json = output_json(&output)?;
            let chain = if backing_chain { info_chain(&filename, format.as_deref())? } else { vec![info(&filename, format.as_deref())?] };
            match (json, backing_chain) {
                (true, true) => println!("{}", serde_json::to_string_pretty(&chain)?),
                (true, false) => println!("{}", serde_json::to_string_pretty(&chain[0])?),
                (false, _) => print!("{}", chain.iter().map(info_text).collect::<Vec<_>>().join("\n")),
            }
        }
        Cmd::Check { format, repair, output, filename } => {
            let (filename, format) = image_arg(filename, format)?;
            let json = output_json(&output)?;
            let outcome = check(&filename, format.as_deref(), repair.as_deref())?;
            for m in &outcome.report.messages {
                eprintln!("{m}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&check_json(&filename, &outcome.report))?);
            } else {
                print!("{}", check_text(&outcome.report));
            }
            return Ok(outcome.exit_code);
        }
        Cmd::Resize { format, shrink, preallocation, filename, size } => {
            let (filename, format) = image_arg(filename, format)?;
            resize_preallocated(&filename, format.as_deref(), &size, shrink, preallocation.as_deref())?;
            println!("Image resized.");
        }
        Cmd::Snapshot { list, create, apply, delete, filename } => {
            let (filename, _) = image_arg(filename, None)?;
            let action = match (list, create.as_deref(), apply.as_deref(), delete.as_deref()) {
                (true, None, None, None) => SnapshotAction::List,
                (false, Some(n), None, None) => SnapshotAction::Create(n),
                (false, None, Some(n), None) => SnapshotAction::Apply(n),
                (false, None, None, Some(n)) => SnapshotAction::Delete(n),
                _ => anyhow::bail!("give exactly one of -l, -c NAME, -a NAME, -d NAME"),
            };
            print!("{}", snapshot(&filename, action)?);
        }
        Cmd::Rebase { format, backing, backing_format, unsafe_mode, filename } => {
            let (filename, format) = image_arg(filename, format)?;
            if format.as_deref().is_some_and(|f| f != "qcow2") {
                anyhow::bail!("only qcow2 images have backing files");
            }
            rebase(&filename, &backing, backing_format.as_deref(), unsafe_mode)?;
        }
        Cmd::Commit { format, keep, base, filename } => {
            let (filename, format) = image_arg(filename, format)?;
            if format.as_deref().is_some_and(|f| f != "qcow2") {
                anyhow::bail!("only qcow2 images have backing files to commit to");
            }
            commit(&filename, keep, base.as_deref())?;
            println!("Image committed.");
        }
        Cmd::Compare { format, format2, strict, first, second } => {
            let (first, format) = image_arg(first, format)?;
            let (second, format2) = image_arg(second, format2)?;
            let (verdict, size_mismatch) = match compare(&first, format.as_deref(), &second, format2.as_deref(), strict) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("rvirt-img: {}", error_text(&e));
                    return Ok(2);
                }
            };
            if size_mismatch && !matches!(verdict, Comparison::StrictMismatch(_)) {
                println!("Warning: Image size mismatch!");
            }
            return Ok(match verdict {
                Comparison::Identical => {
                    println!("Images are identical.");
                    0
                }
                Comparison::Mismatch(at) => {
                    println!("Content mismatch at offset {at}!");
                    1
                }
                Comparison::StrictMismatch(msg) => {
                    println!("{msg}");
                    1
                }
            });
        }
        Cmd::Map { format, output, filename } => {
            let (filename, format) = image_arg(filename, format)?;
            let entries = map(&filename, format.as_deref())?;
            if output_json(&output)? {
                print!("{}", map_json(&entries)?);
            } else {
                print!("{}", map_text(&entries)?);
            }
        }
        Cmd::Bitmap { add, remove, clear, enable, disable, merge, granularity, source_file, source_format, format, filename, bitmap: name } => {
            let (filename, format) = image_arg(filename, format)?;
            let flags = [("--add", add), ("--remove", remove), ("--clear", clear), ("--enable", enable), ("--disable", disable)];
            let actions = bitmap_actions(std::env::args().skip(1), &flags, &merge);
            let granularity = granularity.as_deref().map(parse_size).transpose()?;
            bitmap(&BitmapRequest { path: filename, format, name, actions, granularity, source: source_file.map(|p| (p, source_format)) })?;
        }
        Cmd::Bench { count, depth, format, flush_interval, aio: _, nocache, no_drain: _, offset, pattern, quiet, size, step, cache, write, filename } => {
            let (filename, format) = image_arg(filename, format)?;
            let direct = nocache || matches!(cache.as_deref(), Some("none" | "directsync"));
            if let Some(c) = cache.as_deref() {
                cache_mode_flushes(c)?;
            }
            let req = BenchRequest {
                count,
                depth,
                buffer_size: size.as_deref().map(parse_size).transpose()?.unwrap_or(4096),
                step: step.as_deref().map(parse_size).transpose()?,
                offset: offset.as_deref().map(parse_size).transpose()?.unwrap_or(0),
                write,
                pattern: pattern.unwrap_or(0),
                flush_interval,
                direct,
                quiet,
            };
            bench(&filename, format.as_deref(), &req)?;
        }
        Cmd::Dd { format, output_format, operands } => {
            let mut req = DdRequest::parse(&operands)?;
            req.input_format = format;
            req.output_format = output_format;
            dd(&req)?;
        }
        Cmd::Amend { format, options, force: _, progress: _, quiet: _, filename } => {
            if options.iter().flat_map(|o| o.split(',')).any(|o| o == "help" || o == "?") {
                print!("{AMEND_HELP}");
                return Ok(0);
            }
            let (filename, format) = image_arg(filename, format)?;
            amend(&filename, format.as_deref(), &options)?;
        }
        Cmd::Measure { output_format, options, size, format, output, filename } => {
            let opts = MeasureOptions::parse(&options)?;
            let (filename, format) = match filename {
                Some(f) => {
                    let (f, fmt) = image_arg(f, format)?;
                    (Some(f), fmt)
                }
                None => (None, format),
            };
            let size = size.as_deref().map(parse_size).transpose()?;
            let m = measure(&output_format, &opts, size, filename.as_deref().map(|p| (p, format.as_deref())))?;
            if output_json(&output)? {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("required size: {}\nfully allocated size: {}\n", m.required, m.fully_allocated);
                if let Some(b) = m.bitmaps {
                    println!("bitmaps size: {b}");
                }
            }
        }
    }
    Ok(0)
}

/// The snapshot `convert -l PARAM` / `-s ID` names: `NAME`,
/// `snapshot.name=NAME` or `snapshot.id=ID` (ids and names are looked up alike).
fn snapshot_arg(param: Option<&str>, id: Option<String>) -> anyhow::Result<Option<String>> {
    let Some(param) = param else { return Ok(id) };
    if id.is_some() {
        anyhow::bail!("-l and -s name the snapshot twice; give one");
    }
    let mut found = None;
    for kv in param.split(',') {
        match kv.split_once('=') {
            Some(("snapshot.name" | "snapshot.id", v)) if !v.is_empty() => found = Some(v.to_string()),
            None if !kv.is_empty() => found = Some(kv.to_string()),
            _ => anyhow::bail!("invalid -l '{param}': expected NAME, snapshot.name=NAME or snapshot.id=ID"),
        }
    }
    found.map(Some).ok_or_else(|| anyhow::anyhow!("-l names no snapshot"))
}

/// The bitmap steps in the order the command line gives them (clap keeps
/// each flag's value, not the order between flags): each flag that was set,
/// at its place among the arguments.
fn bitmap_actions(args: impl Iterator<Item = String>, flags: &[(&str, bool); 5], merge: &[String]) -> Vec<BitmapAction> {
    let action = |flag: &str| match flag {
        "--add" => BitmapAction::Add,
        "--remove" => BitmapAction::Remove,
        "--clear" => BitmapAction::Clear,
        "--enable" => BitmapAction::Enable,
        _ => BitmapAction::Disable,
    };
    let mut out = Vec::new();
    let mut merges = merge.iter();
    for a in args {
        if a == "--" {
            break;
        }
        if let Some((flag, _)) = flags.iter().find(|(f, set)| *set && *f == a) {
            out.push(action(flag));
        } else if a == "--merge" || a.starts_with("--merge=") {
            if let Some(m) = merges.next() {
                out.push(BitmapAction::Merge(m.clone()));
            }
        }
    }
    out
}

/// The error and its causes on one line, each said once: the image
/// library's errors already carry their OS error in their text.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if m.starts_with(&out) {
            // A context that only named the file the cause names again.
            out = m;
        } else if !out.contains(&m) {
            if !out.is_empty() {
                out += ": ";
            }
            out += &m;
        }
    }
    out
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rvirt-img: {}", error_text(&e));
            // qemu-img's exit code for a check of a format without checks.
            ExitCode::from(if e.downcast_ref::<CheckUnsupported>().is_some() { 63 } else { 1 })
        }
    }
}
