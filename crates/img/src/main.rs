//! `rvirt-img`: create and inspect disk images (qemu-img's command names and flags).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rvirt_img::{cache_mode_flushes, convert, create, info, info_text, parse_size, ConvertRequest, CreateRequest};

/// Create and inspect raw and qcow2 disk images.
#[derive(Parser)]
#[command(name = "rvirt-img", version, about)]
struct Cli {
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
        /// Options: size=, backing_file=, backing_fmt=, cluster_size=, compat=, preallocation=off.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// The image to create.
        filename: PathBuf,
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
        /// Compress the destination (not supported yet).
        #[arg(short = 'c')]
        compress: bool,
        /// Source image.
        source: PathBuf,
        /// Destination image.
        dest: PathBuf,
    },
    /// Show an image's format, sizes and backing file.
    Info {
        /// Format (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// human (default) or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// The image.
        filename: PathBuf,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Create { format, backing, backing_format, options, filename, size } => {
            let size = size.as_deref().map(parse_size).transpose()?;
            create(&CreateRequest { path: filename, format, size, backing_file: backing, backing_format, options })
        }
        Cmd::Convert { format, output_format, options, progress, cache, compress, source, dest } => {
            if compress {
                anyhow::bail!("-c (compressed output) is not supported yet");
            }
            let flush = cache_mode_flushes(&cache)?;
            convert(&ConvertRequest { source, source_format: format, dest, dest_format: output_format, options, progress, flush })?;
            Ok(())
        }
        Cmd::Info { format, output, filename } => {
            let i = info(&filename, format.as_deref())?;
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&i)?),
                "human" => print!("{}", info_text(&i)),
                other => anyhow::bail!("invalid --output '{other}': expected human or json"),
            }
            Ok(())
        }
    }
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rvirt-img: {e:#}");
            ExitCode::from(1)
        }
    }
}
