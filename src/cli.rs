//! Command-line definitions (clap derive). The contract is in docs/design.md and man/vmref.1.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "vmref",
    version,
    about = "Resilient change tracking, reference points and point-in-time images for raw VM disks",
    after_help = "Examples:\n  vmref --store /srv/vm1 init\n  vmref --store /srv/vm1 disk add disk0 /srv/images/vm1.img\n  vmref --store /srv/vm1 mount /run/vmref/vm1\n  vmref --store /srv/vm1 backup nightly-1\n\nEach command's --help has examples; `man vmref` has every command in full."
)]
pub struct Cli {
    /// The store directory (else $VMREF_STORE, else the config's `store`, else /var/lib/vmref)
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Config file (else /etc/vmref/config.toml when present)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More log output (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors; no progress bars
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 init\n  vmref --store /srv/vm1 init --block-size 128K --compression zstd:6\n  vmref --store /srv/vm1 init --repository s3://backups/vms\n  vmref --store /srv/vm2 init --repository s3://backups/vms --attach --key-file /srv/vm1/repo.key"
    )]
    /// Create the store
    Init {
        /// Change-tracking block size: a power of two from 4K to 4M
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
        /// Compression of stored blocks: none, zstd (level 3) or zstd:1 to zstd:19
        #[arg(long, value_name = "ALGO")]
        compression: Option<String>,
        /// Keep backup data in an S3 bucket (s3://BUCKET[/PREFIX]) or a directory (an
        /// absolute path) instead of STORE/repo
        #[arg(long, value_name = "URL")]
        repository: Option<String>,
        /// Back up into the existing repository named by --repository, shared with the stores
        /// already in it (blocks are stored once across them); an encrypted one needs
        /// --key-file with a copy of its key
        #[arg(long, requires = "repository", conflicts_with_all = ["encrypt", "no_encrypt", "compression"])]
        attach: bool,
        /// Encrypt the repository under a new key kept in STORE/repo.key (the default for
        /// s3:// repositories)
        #[arg(long, conflicts_with = "no_encrypt")]
        encrypt: bool,
        /// Do not encrypt an s3:// repository
        #[arg(long)]
        no_encrypt: bool,
        /// Encrypt under the key of this key file (a copy of another store's repo.key)
        /// instead of a new key; implies --encrypt
        #[arg(long, value_name = "PATH", conflicts_with = "no_encrypt")]
        key_file: Option<PathBuf>,
    },
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 disk add disk0 /srv/images/vm1.img\n  vmref --store /srv/vm1 disk list --json"
    )]
    /// Register, list or remove disks
    #[command(subcommand)]
    Disk(DiskCmd),
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 ref create veeam-42 --owner veeam\n  vmref --store /srv/vm1 ref list --owner veeam"
    )]
    /// Create, list, show, demote or delete reference points
    #[command(subcommand)]
    Ref(RefCmd),
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 changes --since veeam-42\n  vmref --store /srv/vm1 changes --since nightly-1 --disk disk0 --json"
    )]
    /// Changed byte extents since a reference point
    Changes {
        /// The reference point to compare with
        #[arg(long, value_name = "REF")]
        since: String,
        /// Only this disk
        #[arg(long, value_name = "NAME")]
        disk: Option<String>,
        /// Print one JSON document on stdout
        #[arg(long)]
        json: bool,
    },
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 mount /run/vmref/vm1 --allow-other\n  qemu-system-x86_64 ... -drive file=/run/vmref/vm1/live/disk0.img,format=raw,cache=none\n  vmref mount --repository s3://backups/vms --key-file /root/vms.key /mnt/vms"
    )]
    /// Mount the store: live/DISK.img tracked read-write, POINT/DISK.img read-only
    Mount {
        mountpoint: PathBuf,
        /// Stay in the foreground (logs on stderr) instead of returning once mounted
        #[arg(long)]
        foreground: bool,
        /// Let other users reach the mount (their access still follows file permissions)
        #[arg(long)]
        allow_other: bool,
        /// Mount the points every store published in this repository (s3://BUCKET[/PREFIX]
        /// or a directory) read-only as STORE@POINT/DISK.img, without any store
        #[arg(long, value_name = "URL")]
        repository: Option<String>,
        /// The repository's key (a copy of a store's repo.key), for an encrypted one
        #[arg(long, value_name = "PATH", requires = "repository")]
        key_file: Option<PathBuf>,
        /// Where a repository mount keeps its S3 read cache and its log (default
        /// ~/.cache/vmref/repo-HASH)
        #[arg(long, value_name = "DIR", requires = "repository")]
        cache_dir: Option<PathBuf>,
    },
    #[command(after_help = "Examples:\n  vmref umount /run/vmref/vm1")]
    /// Unmount, waiting until the daemon has flushed tracking state; clears a dead mount
    Umount { mountpoint: PathBuf },
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 backup nightly-1\n  vmref --store /srv/vm1 backup weekly-1 --full\n  vmref --store /srv/vm1 backup veeam-43 --owner veeam --since veeam-42 --json"
    )]
    /// Checkpoint NAME, copy its blocks into the store, demote it: a restorable point
    Backup {
        name: String,
        /// Copy every non-zero block, whatever earlier backups hold
        #[arg(long, conflicts_with = "since")]
        full: bool,
        /// Copy the blocks changed since this restorable point (default: the newest one)
        #[arg(long, value_name = "REF")]
        since: Option<String>,
        /// The backup tool or policy that owns the point (only `prune --owner` of it removes it)
        #[arg(long)]
        owner: Option<String>,
        /// Print one JSON document on stdout
        #[arg(long)]
        json: bool,
    },
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 restore nightly-1 --disk disk0 --to /tmp/vm1-nightly-1.img"
    )]
    /// Write a point's image of one disk as a sparse raw file
    Restore {
        #[arg(value_name = "REF")]
        point: String,
        /// The disk to restore
        #[arg(long, value_name = "NAME")]
        disk: String,
        /// Where to write the sparse raw image
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
        /// Overwrite PATH if it exists
        #[arg(long)]
        force: bool,
    },
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 verify\n  vmref --store /srv/vm1 verify nightly-1 --json\n  vmref --store /srv/vm1 verify --repair\n  vmref --store /srv/vm1 verify --repair --from /backup/vm1-replica"
    )]
    /// Check every stored block of one restorable point, or of all, against its checksum
    Verify {
        #[arg(value_name = "REF")]
        point: Option<String>,
        /// Store damaged blocks and map nodes again from good bytes: a live disk where tracking
        /// proves them the point's, a replica image (`receive --apply`), a --from store; each
        /// checked against its hash before anything is written. Then check again
        #[arg(long)]
        repair: bool,
        /// With --repair: another store to take blocks, map nodes and replica images from
        /// (the sending or receiving end of replication); repeatable
        #[arg(long, value_name = "STORE", requires = "repair")]
        from: Vec<PathBuf>,
        /// Print one JSON document on stdout
        #[arg(long)]
        json: bool,
    },
    /// Delete the restorable points no retention rule keeps (every kept point stays exact)
    #[command(after_help = "\
A point kept by any rule is kept. Each period rule keeps the newest point of each of the N
most recent periods (local time, $TZ honoured) that have one. The policy applies to the
points of --owner, or without it to the points without an owner; plain points are never
pruned. Without any --keep-* flag the rules are the config file's [retention] table
(keep_last, keep_daily, ...); any flag replaces the whole table.

Examples:
  vmref prune --keep-last 3 --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run
  vmref prune            # the [retention] table of /etc/vmref/config.toml
  vmref prune --owner veeam --keep-last 3")]
    Prune {
        #[command(flatten)]
        policy: crate::backup::retention::Policy,
        /// Apply the policy to this owner's points (default: the points without an owner)
        #[arg(long)]
        owner: Option<String>,
        /// List what would be deleted and what is kept (and by which rules); delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON document on stdout
        #[arg(long)]
        json: bool,
    },
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 status\n  vmref --store /srv/vm1 status --json\n  vmref --store /srv/vm1 status --check --max-age 93600"
    )]
    /// The store, its disks and their tracking state
    Status {
        /// Print one JSON document on stdout
        #[arg(long)]
        json: bool,
        /// For monitors: print one line and exit non-zero when a disk is unavailable, its
        /// changes since the newest backup are unknown (the next backup must be full), the
        /// last backup attempt failed, or the newest backup is older than --max-age
        #[arg(long)]
        check: bool,
        /// With --check: the oldest acceptable newest backup, in seconds (else the config's
        /// max_backup_age_secs; unset: age is not checked)
        #[arg(long, value_name = "SECS", requires = "check")]
        max_age: Option<u64>,
    },
    /// Print a completion script for SHELL (bash, zsh or fish) on stdout
    #[command(
        after_help = "Examples:\n  vmref completions bash > /etc/bash_completion.d/vmref\n  vmref completions zsh > \"${fpath[1]}/_vmref\"\n  vmref completions fish > ~/.config/fish/completions/vmref.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a point as a replication stream (stdout, or --output FILE) for `vmref receive`
    #[command(after_help = "\
Examples:
  vmref send monday | ssh dr-host vmref --store /srv/vm1 receive
  vmref send tuesday --since monday | ssh dr-host vmref --store /srv/vm1 receive
  vmref send --checkpoint rep-2 --since rep-1 --output /tmp/rep-2.stream
  vmref send --resume vmref1-7b22...  | ssh dr-host vmref --store /srv/vm1 receive")]
    Send {
        /// A restorable point to send
        #[arg(value_name = "POINT", required_unless_present_any = ["checkpoint", "resume"])]
        point: Option<String>,
        /// Instead of POINT: checkpoint the live disks as point NAME, send it, keep NAME as a
        /// plain point (the base of the next send)
        #[arg(long, value_name = "NAME", conflicts_with = "point")]
        checkpoint: Option<String>,
        /// Send only the blocks that differ from this point, which the receiver holds
        #[arg(long, value_name = "BASE")]
        since: Option<String>,
        /// Continue a transfer that `vmref receive` reported cut short, from its token
        #[arg(long, value_name = "TOKEN", conflicts_with_all = ["point", "checkpoint", "since"])]
        resume: Option<String>,
        /// With --checkpoint: the owner of point NAME
        #[arg(long, requires = "checkpoint")]
        owner: Option<String>,
        /// Write the stream to FILE (made whole or not at all) instead of stdout
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Read a replication stream (stdin, or --input FILE) into this store as the same point
    #[command(after_help = "\
Examples:
  vmref send monday | ssh dr-host vmref --store /srv/vm1 receive --apply disk0=/srv/replica/disk0.img
  vmref receive --input /tmp/rep-2.stream
  vmref receive --abort      # discard a cut transfer, finish an interrupted apply")]
    Receive {
        /// Read the stream from FILE instead of stdin
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Also keep a raw replica image of DISK at the received point (repeatable)
        #[arg(long, value_name = "DISK=IMAGE")]
        apply: Vec<String>,
        /// Discard a partial receive and finish any interrupted apply; reads no stream
        #[arg(long, conflicts_with_all = ["input", "apply"])]
        abort: bool,
        /// Print one JSON document on stdout
        #[arg(long)]
        json: bool,
    },
    /// Replica images kept by `receive --apply`: list, promote to live disks, forget
    #[command(
        subcommand,
        after_help = "Examples:\n  vmref --store /srv/vm1 replica list\n  vmref --store /srv/vm1 replica promote disk0"
    )]
    Replica(ReplicaCmd),
    #[command(after_help = "Examples:\n  vmref --store /srv/vm1 upgrade")]
    /// Convert a store made by an older release to the current format, in place
    Upgrade {
        /// Print one JSON document on stdout
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DiskCmd {
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 disk add disk0 /srv/images/vm1.img"
    )]
    /// Register IMAGE as disk NAME and start tracking it
    Add { name: String, image: PathBuf },
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 disk list\n  vmref --store /srv/vm1 disk list --json"
    )]
    /// List registered disks
    List {
        /// Print one JSON document on stdout
        #[arg(long)]
        json: bool,
    },
    #[command(after_help = "Examples:\n  vmref --store /srv/vm1 disk remove disk1")]
    /// Stop tracking a disk (its image is left alone)
    Remove { name: String },
}

#[derive(Debug, Args)]
pub struct Json {
    /// Print one JSON document on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RefCmd {
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 ref create veeam-42 --owner veeam\n  vmref --store /srv/vm1 ref create before-upgrade --checkpoint"
    )]
    /// Create a reference point (metadata only), or with --checkpoint a stable image
    Create {
        name: String,
        /// The backup tool or vendor that owns the point (owners never disturb each other)
        #[arg(long)]
        owner: Option<String>,
        /// Keep the point's image readable (copy-on-write) until `ref demote`; lasts as long
        /// as the mounted daemon (without a mount it ends with this command)
        #[arg(long)]
        checkpoint: bool,
    },
    #[command(after_help = "Examples:\n  vmref --store /srv/vm1 ref demote before-upgrade")]
    /// Drop a checkpoint's saved data, leaving a plain point
    Demote { name: String },
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 ref list\n  vmref --store /srv/vm1 ref list --owner veeam --json"
    )]
    /// List reference points, oldest first
    List {
        /// Only points of this owner
        #[arg(long)]
        owner: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    #[command(after_help = "Examples:\n  vmref --store /srv/vm1 ref show nightly-1 --json")]
    /// Show one reference point
    Show {
        name: String,
        #[command(flatten)]
        json: Json,
    },
    #[command(after_help = "Examples:\n  vmref --store /srv/vm1 ref delete veeam-41")]
    /// Delete a reference point
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCmd {
    /// List the replica images this store keeps, and the point each holds
    #[command(after_help = "Examples:\n  vmref --store /srv/vm1 replica list --json")]
    List {
        #[command(flatten)]
        json: Json,
    },
    /// Make replica images live disks of this store (failover, migration): tracking starts
    /// exactly at the point each holds, so the next backup or send since it is incremental
    #[command(
        after_help = "Examples:\n  vmref --store /srv/vm1 replica promote disk0 && vmref --store /srv/vm1 mount /mnt/vmref"
    )]
    Promote {
        #[arg(required = true)]
        disks: Vec<String>,
    },
    /// Stop keeping a replica image (the image file is left alone)
    #[command(after_help = "Examples:\n  vmref --store /srv/vm1 replica forget disk0")]
    Forget { disk: String },
}
