//! Argument parsing and dispatch. No logic beyond turning arguments into requests.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vmrepl_host::datadir::DataDir;
use vmrepl_host::mgmt::Client;
use vmrepl_types::api::{CreateVm, DiskSpec, Request, Response};
use vmrepl_types::{Accel, Generation, NicMode, VmName};

/// vmrepl: Hyper-V Replica for Linux hosts that run QEMU/KVM.
#[derive(Parser, Debug)]
#[command(name = "vmrepl", version, about, long_about = None)]
pub struct Args {
    /// The host's data folder (one per host; several hosts can share a machine)
    /// [default: /var/lib/vmrepl].
    #[arg(long, global = true, env = "VMREPL_DATA")]
    pub data: Option<PathBuf>,
    /// The host's configuration file, the admin's (vmrepl never rewrites it) [default:
    /// DATA/config.toml; without --data, /etc/vmrepl/vmrepl.toml unless /var/lib/vmrepl has a
    /// config.toml]. See docs/configuration.md.
    #[arg(long, global = true, env = "VMREPL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print answers as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create and inspect this host.
    #[command(subcommand)]
    Host(HostCmd),
    /// Run the host daemon (VM supervision, management API, peer listener).
    Daemon {
        /// Start in the background, log to DATA/daemon.log, return once it answers.
        #[arg(long)]
        background: bool,
    },
    /// Define, run and inspect VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Replica server settings and VM replication (Hyper-V Replica's verbs).
    #[command(subcommand)]
    Replication(ReplCmd),
    /// Test, planned and unplanned failover (Hyper-V's Start-/Stop-/Complete-VMFailover).
    #[command(subcommand)]
    Failover(FailoverCmd),
    /// Stop the daemon (running VMs keep running; it reattaches at next start).
    Stop,
    /// Find what keeps replication from working, each finding with its cause and fix: this
    /// host and the replica servers its VMs use; a VM's relationship (from either side); or,
    /// before enabling, a replica server (like Test-VMReplicationConnection). Exits 0 when
    /// nothing blocks replication, 1 when something does.
    Doctor {
        /// A VM: its relationship (or, with --replica-server, only this VM).
        vm: Option<String>,
        /// A replica server to check, HOST:PORT (nothing is created there).
        #[arg(long)]
        replica_server: Option<String>,
        /// The name in the replica server's certificate, when HOST is not it.
        #[arg(long)]
        replica_name: Option<String>,
    },
    /// The host's event journal: every replication state change (with a stable code and a
    /// severity) and notes, oldest first.
    Events {
        /// Only this VM's (a VM or replica VM of this host, by name or UUID).
        #[arg(long)]
        vm: Option<String>,
        /// Only from this time on: a duration back from now (`90s`, `30m`, `12h`, `7d`), a UTC
        /// time (`2026-12-06T04:30:00Z`, `2026-12-06 04:30`) or Unix milliseconds.
        #[arg(long)]
        since: Option<String>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 200)]
        limit: u32,
        /// Keep printing new events as they are recorded (until interrupted).
        #[arg(long)]
        follow: bool,
    },
    /// Print the web dashboard's URL with its sign-in token (docs/dashboard.md).
    Dashboard {
        /// Make a new token first (signs out every browser that used the old one).
        #[arg(long)]
        rotate: bool,
    },
    /// Print a completion script for SHELL to stdout (the .deb installs those of bash, zsh
    /// and fish), e.g. `vmrepl completions bash > /etc/bash_completion.d/vmrepl`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages into DIR: vmrepl.1 and one per subcommand (vmrepl-vm.1, ...).
    #[command(hide = true)]
    Man {
        /// The folder to write them into (created when missing).
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReplCmd {
    /// Replica server settings of this host (Hyper-V Settings > Replication Configuration).
    #[command(subcommand)]
    Server(ServerCmd),
    /// Enable replication of a VM to a replica server (starts initial replication).
    Enable(EnableArgs),
    /// Where each replication relationship on this host stands.
    Status {
        /// Only this VM.
        name: Option<String>,
        /// Keep showing the status every second until it is replicating and healthy (or --for).
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this many seconds.
        #[arg(long = "for", default_value_t = 600)]
        watch_for: u64,
    },
    /// A relationship's statistics over the monitoring window (Measure-VMReplication):
    /// sizes, latencies, cycles by outcome, the last successful cycle and points.
    Measure {
        name: String,
        /// Start the statistics anew from now (Reset-VMReplicationStatistics).
        #[arg(long)]
        reset: bool,
    },
    /// Pause replication of one or more VMs (changes are still tracked).
    Pause {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Change a relationship's settings in place (Set-VMReplication): in force from the next
    /// cycle, without a new initial copy (except a new replica server, which needs one).
    Set(SetArgs),
    /// On the replica server: import an initial copy exported to external media.
    Import {
        name: String,
        /// The exported NAME.vmrlog, or the folder that holds it.
        #[arg(long)]
        from: PathBuf,
    },
    /// Replicate now, outside the schedule.
    Now {
        #[arg(required = true)]
        names: Vec<String>,
        /// Freeze the guest through the QEMU guest agent for this point (falls back to a
        /// crash-consistent point, and says so, when the guest cannot be frozen).
        #[arg(long)]
        app_consistent: bool,
    },
    /// Resume paused replication of one or more VMs.
    Resume {
        #[arg(required = true)]
        names: Vec<String>,
        /// Resynchronize a relationship that needs it ("Resynchronization required"):
        /// the disks are copied again at one instant and deltas flow from there.
        #[arg(long)]
        resynchronize: bool,
    },
    /// Remove replication of one or more VMs (the replica keeps its data unless
    /// --delete-replica). On the replica server it removes the replica kept there.
    Remove {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        delete_replica: bool,
    },
    /// Recovery points of a replica VM (on the replica server).
    Points { name: String },
    /// On the replica server: which network each adapter of a replica VM joins on failover
    /// and on test failover (default: not connected). Without options, shows them.
    Network {
        name: String,
        /// Only this adapter (0, 1, ...); default: every adapter.
        #[arg(long)]
        adapter: Option<usize>,
        /// On failover: user, none, tap:IF or bridge:BR (a network of this host).
        #[arg(long, value_parser = parse_nic)]
        failover: Option<NicMode>,
        /// On test failover: user, none, tap:IF or bridge:BR.
        #[arg(long, value_parser = parse_nic)]
        test: Option<NicMode>,
        /// Failover TCP/IP of --adapter: the static ADDRESS/PREFIX the guest gets on it when
        /// the VM fails over (set through the QEMU guest agent).
        #[arg(long, requires = "adapter")]
        failover_ip: Option<String>,
        /// With --failover-ip: the default gateway.
        #[arg(long, requires = "failover_ip")]
        gateway: Option<String>,
        /// With --failover-ip: a DNS server (repeatable).
        #[arg(long, requires = "failover_ip")]
        dns: Vec<String>,
        /// Remove the adapter's failover TCP/IP.
        #[arg(long, conflicts_with = "failover_ip")]
        no_failover_ip: bool,
    },
    /// After a failover: replicate the VM back to the old primary (Set-VMReplication -Reverse).
    Reverse(ReverseArgs),
}

#[derive(Subcommand, Debug)]
pub enum FailoverCmd {
    /// On the primary: ship the last changes of a shut-down VM and lock it (planned failover).
    Prepare { name: String },
    /// On the replica: fail over to the latest or a chosen recovery point.
    Start {
        name: String,
        /// Sequence of the recovery point (`vmrepl replication points`); default: the latest.
        #[arg(long)]
        point: Option<u64>,
        /// Start the VM once it has failed over.
        #[arg(long)]
        start: bool,
        /// Fail over even though the primary reports the VM running or cannot be asked:
        /// two copies of the VM may then run and diverge.
        #[arg(long)]
        risk_split_brain: bool,
        /// Connect the failed-over VM's adapters to this network of this host (user, tap:IF,
        /// bridge:BR); default: not connected. The primary's own network names are never used.
        #[arg(long, value_parser = parse_nic)]
        network: Option<NicMode>,
    },
    /// On the replica: create a test VM "NAME - Test" from a point (replication goes on).
    Test {
        name: String,
        #[arg(long)]
        point: Option<u64>,
        /// Connect the test VM's adapters to this network (user, tap:IF, bridge:BR);
        /// default: not connected.
        #[arg(long, value_parser = parse_nic)]
        test_network: Option<NicMode>,
    },
    /// On the replica: stop and delete the test VM and everything it wrote.
    StopTest { name: String },
    /// On the primary: cancel a prepare. On the replica: undo a failover not yet completed.
    Cancel { name: String },
    /// On the replica: keep the failed-over VM and delete the other recovery points.
    Complete {
        name: String,
        /// Do not ask: deleting the other recovery points cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServerCmd {
    /// Show the replica server settings.
    Show,
    /// Change the replica server settings.
    Set {
        /// Enable this host as a replica server.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Disable it.
        #[arg(long)]
        disable: bool,
        /// Accept any authenticated primary (trust group DEFAULT) into --default-storage.
        #[arg(long, conflicts_with = "listed_only")]
        allow_any: bool,
        /// Accept only primaries that match an authorization entry.
        #[arg(long)]
        listed_only: bool,
        /// Storage folder for replicas from any authenticated primary.
        #[arg(long)]
        default_storage: Option<PathBuf>,
        /// Let a primary that removes its replication delete the replica's data here too.
        #[arg(long, conflicts_with = "keep_removed_replicas")]
        allow_remote_delete: bool,
        /// Keep a replica's data when its primary removes the replication (the default).
        #[arg(long)]
        keep_removed_replicas: bool,
    },
    /// Authorize primaries (host-name pattern; `*` only as the whole first label).
    Authorize {
        /// Primary host name or pattern, e.g. hosta.example.org or *.example.org.
        #[arg(long)]
        primary: String,
        /// Where their replica VMs are stored.
        #[arg(long)]
        storage: PathBuf,
        /// Trust group: a replica VM accepts logs only from primaries of its group.
        #[arg(long, default_value = "DEFAULT")]
        trust_group: String,
        /// SHA-256 fingerprint of the CA that must have issued the primary's certificate
        /// (`vmrepl host trust` prints it); other trusted CAs cannot vouch for this pattern.
        #[arg(long, value_name = "SHA256")]
        issuer: Option<String>,
        /// SHA-256 fingerprint of the primary's certificate itself (`vmrepl host info` on the
        /// primary prints it): only that certificate is accepted; renewing it needs a new pin.
        #[arg(long, value_name = "SHA256")]
        pin: Option<String>,
    },
    /// Remove an authorization entry.
    Revoke {
        #[arg(long)]
        primary: String,
    },
    /// Let one primary adopt a stopped VM of this host as its replica (initial replication
    /// from an existing copy, e.g. a VM restored from a backup). Nothing else can be adopted.
    AcceptCopy {
        /// The local VM (its name on this host).
        name: String,
        /// The primary's host name, as its certificate names it.
        #[arg(long)]
        primary: String,
        /// Take a designation back.
        #[arg(long)]
        withdraw: bool,
    },
}

#[derive(ClapArgs, Debug)]
pub struct EnableArgs {
    /// One or more VMs (each gets the same settings).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// The replica server, HOST:PORT.
    #[arg(long)]
    pub replica_server: String,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

#[derive(ClapArgs, Debug)]
pub struct ReverseArgs {
    pub name: String,
    /// Where to replicate back to, HOST:PORT (default: the old primary, where it said it listens).
    #[arg(long)]
    pub replica_server: Option<String>,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

/// What `replication set` changes; each option left out stays as it is.
#[derive(ClapArgs, Debug)]
pub struct SetArgs {
    /// One or more VMs.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Seconds between replication cycles: 30, 300 or 900 (or any value from 5).
    #[arg(long)]
    pub frequency: Option<u32>,
    /// Additional recovery points to keep (0 to 24).
    #[arg(long)]
    pub recovery_points: Option<u32>,
    /// Seconds between recovery points.
    #[arg(long)]
    pub point_interval: Option<u32>,
    /// An app-consistent point every N hours (1 to 12); 0 turns them off.
    #[arg(long)]
    pub app_consistent_hours: Option<u32>,
    /// Compression of the logs sent: on or off.
    #[arg(long, value_parser = on_off)]
    pub compression: Option<bool>,
    /// When a required resynchronization starts: automatic, manual, or a daily window
    /// HH:MM-HH:MM in UTC.
    #[arg(long, value_parser = vmrepl_types::replication::ResyncPolicy::parse)]
    pub resync: Option<vmrepl_types::replication::ResyncPolicy>,
    /// Most bytes per second this relationship sends, such as 50M or 800K; 0 for no limit.
    #[arg(long, value_parser = rate)]
    pub bandwidth: Option<u64>,
    /// Move the replica to another replica server, HOST:PORT (a new initial copy there; the
    /// old replica is told and keeps its data).
    #[arg(long)]
    pub replica_server: Option<String>,
    /// The replica server's host name as its certificate names it (default: HOST).
    #[arg(long)]
    pub replica_name: Option<String>,
    /// Replicate this disk from now on (Hyper-V's -ReplicatedDisks); repeatable. It gets its
    /// own initial copy (only its data, zeros not sent) in the next cycle's log, the same point
    /// in time as the other disks' changes; no other disk is copied again. A disk added with
    /// `vm disk add` to a replicated VM is not replicated until it is included here.
    #[arg(long, value_name = "ID")]
    pub include_disk: Vec<String>,
    /// Stop replicating this disk (Hyper-V's -ExcludedVhd); repeatable. Later logs leave it
    /// out, its change-tracking bitmaps are released, and the replica drops its copy from every
    /// recovery point (no placeholder, as in Hyper-V).
    #[arg(long, value_name = "ID")]
    pub exclude_disk: Vec<String>,
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?}: give on or off")),
    }
}

/// A rate in bytes per second (50M, 800K, 0 for none), as 0 for none.
fn rate(s: &str) -> Result<u64, String> {
    vmrepl_types::replication::parse_bandwidth(s).map(|r| r.unwrap_or(0))
}

/// Per-VM replication settings (Enable-VMReplication's parameters).
#[derive(ClapArgs, Debug)]
pub struct SettingsArgs {
    /// The replica server's host name as its certificate names it (default: HOST).
    #[arg(long)]
    pub replica_name: Option<String>,
    /// Seconds between replication cycles: 30, 300 or 900 (or any value from 5).
    #[arg(long, default_value_t = 300)]
    pub frequency: u32,
    /// Additional recovery points to keep (0 to 24).
    #[arg(long, default_value_t = 0)]
    pub recovery_points: u32,
    /// Seconds between recovery points (Hyper-V: hourly).
    #[arg(long, default_value_t = 3600)]
    pub point_interval: u32,
    /// Turn compression off (zstd is on by default).
    #[arg(long)]
    pub no_compression: bool,
    /// A disk id (disk0, disk1, ...) not to replicate; repeatable.
    #[arg(long)]
    pub exclude_disk: Vec<String>,
    /// Take an app-consistent point every N hours (1 to 12): the guest is frozen through
    /// the QEMU guest agent for it. Needs --recovery-points of at least 1.
    #[arg(long)]
    pub app_consistent_hours: Option<u32>,
    /// Start initial replication at this Unix time instead of now.
    #[arg(long, conflicts_with_all = ["initial_export", "initial_existing_copy"])]
    pub initial_at: Option<u64>,
    /// Initial replication by external media: write the initial copy into this folder,
    /// to be carried to the replica server and imported there with `replication import`.
    #[arg(long, conflicts_with = "initial_existing_copy")]
    pub initial_export: Option<PathBuf>,
    /// When a resynchronization starts once one is required (change tracking lost, a log
    /// refused as out of order): `automatic` (default), `manual` (only with `replication
    /// resume --resynchronize`), or a daily window `HH:MM-HH:MM` in UTC such as 18:30-06:00.
    #[arg(long, default_value = "automatic", value_parser = vmrepl_types::replication::ResyncPolicy::parse)]
    pub resync: vmrepl_types::replication::ResyncPolicy,
    /// Initial replication from a copy of the VM that already exists on the replica server
    /// (registered there with `replication import-copy`): only the blocks that differ are sent.
    #[arg(long)]
    pub initial_existing_copy: bool,
    /// Most bytes per second this relationship sends, such as 50M or 800K (default: no limit).
    #[arg(long, value_parser = rate)]
    pub bandwidth: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Add a new empty qcow2 disk of SIZE (such as 2G) to a VM that is off; it gets the next
    /// free id (diskN). A running VM is refused: shut it down first. On a replicated VM the new
    /// disk is not replicated until `replication set VM --include-disk diskN` (as in Hyper-V).
    Add {
        name: String,
        size: String,
        /// The storage folder for the new disk (default: the first one configured).
        #[arg(long)]
        storage: Option<PathBuf>,
    },
    /// Grow a disk to SIZE, such as 20G: VM off, or running (the guest is told at once
    /// through virtio-blk; it grows its partition and file system itself). Never shrinks.
    Resize {
        name: String,
        /// The disk id (disk0, disk1, ...).
        disk: String,
        size: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// Create a host in the data folder: config, TLS identity, database.
    Init(InitArgs),
    /// Show this host's capabilities (QEMU, machine types, firmware, KVM, storage).
    Info,
    /// Let the built-in CA issue a certificate for another host (written to --out).
    IssueCert {
        /// The other host's DNS name.
        #[arg(long)]
        name: String,
        /// Folder to write host.pem, host-key.pem and ca.pem into.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Trust another CA's certificate (PEM) for peer authentication. A running daemon
    /// rereads its trusted CAs at once (as on SIGHUP).
    Trust {
        /// The CA certificate to trust.
        ca: PathBuf,
    },
    /// Refuse a peer certificate at every handshake, inbound and outbound (a denylist kept in
    /// the state database). Takes effect at once if the daemon runs, else when it starts.
    #[command(group = clap::ArgGroup::new("which").required(true))]
    RevokeCert {
        /// SHA-256 fingerprint of the certificate (hex, colons allowed).
        #[arg(group = "which", value_name = "FINGERPRINT")]
        fingerprint: Option<String>,
        /// The certificate (PEM) to revoke, instead of its fingerprint.
        #[arg(long, group = "which", value_name = "FILE")]
        cert: Option<PathBuf>,
        /// Why (kept with the entry).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Take a peer certificate off the revocation list (revoked by mistake). Takes effect at
    /// once if the daemon runs, else when it starts.
    UnrevokeCert {
        /// SHA-256 fingerprint of the certificate (hex, colons allowed).
        fingerprint: String,
    },
}

#[derive(ClapArgs, Debug)]
pub struct InitArgs {
    /// The host's DNS name (its certificate names it; peers authorize it by it).
    #[arg(long)]
    pub name: String,
    /// Address for the peer API, e.g. 127.0.0.2:7443.
    #[arg(long)]
    pub listen: String,
    /// Where other hosts reach this one, HOST:PORT (default: --listen; required in effect
    /// when --listen is a wildcard such as 0.0.0.0:7443).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Storage folder for VM disks (repeatable; default DATA/storage).
    #[arg(long)]
    pub storage: Vec<PathBuf>,
    /// QEMU accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: Accel,
    /// Use an existing host certificate (PEM) instead of the built-in CA.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// CA certificate(s) to trust (PEM), e.g. the CA that issued --cert.
    #[arg(long)]
    pub trust: Vec<PathBuf>,
    /// QEMU system emulator to use.
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// Where to serve the Prometheus metrics page (`HOST:PORT`, plain HTTP, unauthenticated;
    /// port 0 lets the system choose, `host info` shows the URL; "" for none).
    #[arg(long, default_value = vmrepl_host::metrics::DEFAULT_LISTEN)]
    pub metrics: String,
    /// Where to serve the web dashboard (`HOST:PORT`, HTTPS; `vmrepl dashboard` prints its
    /// URL with the token; port 0 lets the system choose; "" for none).
    #[arg(long, default_value = vmrepl_host::dashboard::DEFAULT_LISTEN)]
    pub dashboard: String,
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Define a VM.
    Create(CreateArgs),
    /// List VMs.
    List,
    /// Show one VM.
    Show { name: String },
    /// Start a VM.
    Start { name: String },
    /// Ask the guest to shut down (ACPI power button) and wait.
    Shutdown {
        name: String,
        /// Seconds to wait for the guest.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Stop it hard if the guest has not shut down in time.
        #[arg(long)]
        force: bool,
    },
    /// Stop a VM at once (like pulling the plug).
    Stop { name: String },
    /// Delete a VM (its disks too unless --keep-disks).
    Delete {
        name: String,
        #[arg(long)]
        keep_disks: bool,
    },
    /// For a VM that is off: its disks were changed only by tools that kept its change-tracking
    /// bitmaps (qemu-io, qemu-nbd with the bitmaps loaded); take them as they are, with no
    /// resynchronization. Any other change (a restore, dd, qemu-img convert) needs one.
    TrustDisks { name: String },
    /// Disks of a VM: `vm disk add VM SIZE` adds one (the VM off; it is replicated once
    /// `replication set --include-disk` names it), `vm disk resize VM DISK SIZE` grows one (the
    /// VM off or running; a replicated VM's replica grows its copy with the next cycle, with no
    /// resynchronization).
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Change a VM's vCPUs and memory (Set-VM), in force from its next start; a replicated
    /// VM's replica gets the change with the next cycle, so a failover starts it as it is now.
    Set {
        name: String,
        /// Virtual CPUs (1 to 64).
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory in MiB (32 to 1048576).
        #[arg(long)]
        memory: Option<u64>,
    },
    /// Print the VM's serial console log.
    Console {
        name: String,
        /// Only the last N bytes (default 65536, at most 16777216).
        #[arg(long)]
        tail: Option<u64>,
    },
}

#[derive(ClapArgs, Debug)]
pub struct CreateArgs {
    pub name: String,
    /// 1 = BIOS (SeaBIOS, i440fx), 2 = UEFI (OVMF, q35).
    #[arg(long, default_value_t = 2)]
    pub generation: u8,
    /// UEFI Secure Boot (generation 2 only).
    #[arg(long)]
    pub secure_boot: bool,
    /// Machine type (alias such as q35 or a versioned name); pinned at creation.
    #[arg(long)]
    pub machine: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// New disk of this size (e.g. 64M, 10G); repeatable.
    #[arg(long)]
    pub disk: Vec<String>,
    /// Import an existing image as a disk (converted to qcow2 v3); repeatable.
    #[arg(long)]
    pub import: Vec<PathBuf>,
    /// Storage folder for the disks (one of the host's).
    #[arg(long)]
    pub folder: Option<PathBuf>,
    /// Network adapter: user, none (not connected), tap:IFNAME, bridge:BRIDGE; repeatable.
    #[arg(long)]
    pub nic: Vec<String>,
    /// Direct kernel boot: kernel image.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: initrd.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
}

/// Parses sizes like `512`, `64K`, `64M`, `10G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("size {s:?} is not a number with an optional K, M, G or T suffix"))?;
    n.checked_mul(mult)
        .ok_or_else(|| anyhow!("size {s:?} is too large"))
}

fn parse_nic(s: &str) -> Result<NicMode> {
    Ok(match s {
        "user" => NicMode::User,
        "none" | "not-connected" => NicMode::NotConnected,
        _ => match s.split_once(':') {
            Some(("tap", i)) if !i.is_empty() => NicMode::Tap { ifname: i.into() },
            Some(("bridge", b)) if !b.is_empty() => NicMode::Bridge { bridge: b.into() },
            _ => bail!("network adapter {s:?} is not one of user, none, tap:IFNAME, bridge:BRIDGE"),
        },
    })
}

fn vm_name(s: &str) -> Result<VmName> {
    VmName::new(s).map_err(|e| anyhow!("{e}"))
}

/// Runs the parsed command.
pub fn run(args: Args) -> Result<ExitCode> {
    let dd = DataDir::locate(args.data.as_deref(), args.config.as_deref());
    match args.cmd {
        Cmd::Host(HostCmd::Init(a)) => {
            let opts = vmrepl_host::init::InitOptions {
                host_name: a.name,
                listen: a.listen,
                advertise: a.advertise,
                storage: a.storage,
                accel: a.accel,
                cert: a.cert.zip(a.key),
                trust: a.trust,
                qemu_binary: a.qemu,
                metrics: a.metrics,
                dashboard: a.dashboard,
            };
            let report = vmrepl_host::init::init_host(&dd, opts)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                crate::render::init_report(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Host(HostCmd::IssueCert { name, out, days }) => {
            let files = vmrepl_host::init::issue_cert(&dd, &name, &out, days)?;
            for f in files {
                println!("wrote {}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Host(HostCmd::Trust { ca }) => {
            let p = vmrepl_host::init::trust_ca(&dd, &ca)?;
            let text = std::fs::read_to_string(&ca)
                .with_context(|| format!("reading {}", ca.display()))?;
            let summary = vmrepl_transport::pki::describe(&text)?;
            println!("trusting {} (copied to {})", ca.display(), p.display());
            println!("  subject: {}", summary.subject);
            println!(
                "  SHA-256: {} (use it with `replication server authorize --issuer`)",
                summary.fingerprint_sha256
            );
            if runtime()?
                .block_on(Client::connect(dd.root(), &dd.socket()))
                .is_ok()
            {
                return call(&dd, args.json, Request::HostReloadTrust);
            }
            println!("the daemon is not running; it trusts this CA from its next start");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Host(HostCmd::RevokeCert {
            fingerprint,
            cert,
            reason,
        }) => revoke_cert(&dd, args.json, fingerprint, cert, reason),
        Cmd::Host(HostCmd::UnrevokeCert { fingerprint }) => {
            unrevoke_cert(&dd, args.json, &fingerprint)
        }
        Cmd::Daemon { background } => {
            dd.require_host()?;
            if background {
                start_background(&dd)
            } else {
                vmrepl_host::daemon::run_foreground(&dd)?;
                Ok(ExitCode::SUCCESS)
            }
        }
        Cmd::Host(HostCmd::Info) => {
            let code = call(&dd, args.json, Request::HostInfo)?;
            if args.json || code != ExitCode::SUCCESS {
                return Ok(code);
            }
            println!();
            call(&dd, false, Request::HostCertificates)
        }
        Cmd::Replication(r) => replication(&dd, args.json, r),
        Cmd::Failover(f) => failover(&dd, args.json, f),
        Cmd::Stop => call(&dd, args.json, Request::Shutdown),
        Cmd::Events {
            vm,
            since,
            limit,
            follow,
        } => events(&dd, args.json, vm, since, limit, follow),
        Cmd::Doctor {
            vm,
            replica_server,
            replica_name,
        } => doctor(&dd, args.json, vm, replica_server, replica_name),
        Cmd::Dashboard { rotate } => crate::dashboard::run(&dd, args.json, rotate),
        Cmd::Completions { shell } => {
            crate::generate::completions(shell, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir } => {
            for page in crate::generate::man_pages(&dir)? {
                println!("wrote {}", page.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vm(v) => {
            let req = match v {
                VmCmd::Create(c) => Request::VmCreate(create_request(c)?),
                VmCmd::List => Request::VmList,
                VmCmd::Show { name } => Request::VmShow {
                    name: vm_name(&name)?,
                },
                VmCmd::Start { name } => Request::VmStart {
                    name: vm_name(&name)?,
                },
                VmCmd::Shutdown {
                    name,
                    timeout,
                    force,
                } => Request::VmShutdown {
                    name: vm_name(&name)?,
                    timeout_secs: timeout,
                    force_after: force,
                },
                VmCmd::Stop { name } => Request::VmStop {
                    name: vm_name(&name)?,
                },
                VmCmd::Delete { name, keep_disks } => Request::VmDelete {
                    name: vm_name(&name)?,
                    keep_disks,
                },
                VmCmd::TrustDisks { name } => Request::VmTrustDisks {
                    name: vm_name(&name)?,
                },
                VmCmd::Disk(DiskCmd::Add {
                    name,
                    size,
                    storage,
                }) => Request::VmDiskAdd {
                    name: vm_name(&name)?,
                    size_bytes: parse_size(&size)?,
                    storage,
                },
                VmCmd::Disk(DiskCmd::Resize { name, disk, size }) => Request::VmDiskResize {
                    name: vm_name(&name)?,
                    disk,
                    size_bytes: parse_size(&size)?,
                },
                VmCmd::Set { name, cpus, memory } => Request::VmSet {
                    name: vm_name(&name)?,
                    vcpus: cpus,
                    memory_mib: memory,
                },
                VmCmd::Console { name, tail } => Request::VmConsole {
                    name: vm_name(&name)?,
                    tail_bytes: tail,
                },
            };
            call(&dd, args.json, req)
        }
    }
}

fn replication(dd: &DataDir, json: bool, r: ReplCmd) -> Result<ExitCode> {
    use vmrepl_types::api::ReplicaServerChange;
    use vmrepl_types::replication::AuthorizationEntry;
    let req = match r {
        ReplCmd::Server(ServerCmd::Show) => Request::ReplicaServerShow,
        ReplCmd::Server(ServerCmd::Set {
            enable,
            disable,
            allow_any,
            listed_only,
            default_storage,
            allow_remote_delete,
            keep_removed_replicas,
        }) => {
            let abs = default_storage
                .map(|p| std::path::absolute(&p))
                .transpose()?;
            Request::ReplicaServerSet(ReplicaServerChange {
                enabled: if enable {
                    Some(true)
                } else if disable {
                    Some(false)
                } else {
                    None
                },
                allow_any: if allow_any {
                    Some(true)
                } else if listed_only {
                    Some(false)
                } else {
                    None
                },
                default_storage: abs,
                allow_remote_delete: if allow_remote_delete {
                    Some(true)
                } else if keep_removed_replicas {
                    Some(false)
                } else {
                    None
                },
                ..Default::default()
            })
        }
        ReplCmd::Server(ServerCmd::Authorize {
            primary,
            storage,
            trust_group,
            issuer,
            pin,
        }) => Request::ReplicaServerSet(ReplicaServerChange {
            add_entry: Some(AuthorizationEntry {
                primary,
                storage: std::path::absolute(&storage)?,
                trust_group,
                issuer,
                pin,
            }),
            ..Default::default()
        }),
        ReplCmd::Server(ServerCmd::AcceptCopy {
            name,
            primary,
            withdraw,
        }) => Request::ReplicationAcceptCopy {
            name: vm_name(&name)?,
            primary,
            withdraw,
        },
        ReplCmd::Server(ServerCmd::Revoke { primary }) => {
            Request::ReplicaServerSet(ReplicaServerChange {
                remove_entry: Some(primary),
                ..Default::default()
            })
        }
        ReplCmd::Enable(a) => {
            let settings = a.settings.into_settings(&a.replica_server);
            return each(dd, json, &a.names, |name| Request::ReplicationEnable {
                name,
                settings: settings.clone(),
            });
        }
        ReplCmd::Reverse(a) => Request::ReplicationReverse {
            name: vm_name(&a.name)?,
            settings: a
                .settings
                .into_settings(a.replica_server.as_deref().unwrap_or_default()),
        },
        ReplCmd::Points { name } => Request::RecoveryPoints {
            name: vm_name(&name)?,
        },
        ReplCmd::Network {
            name,
            adapter,
            failover,
            test,
            failover_ip,
            gateway,
            dns,
            no_failover_ip,
        } => Request::ReplicaNetwork {
            name: vm_name(&name)?,
            adapter,
            failover,
            test,
            failover_ip: failover_ip.map(|address| vmrepl_types::api::FailoverIp {
                address,
                gateway,
                dns,
            }),
            clear_failover_ip: no_failover_ip,
        },
        ReplCmd::Measure { name, reset } => {
            return call(
                dd,
                json,
                Request::ReplicationMeasure {
                    name: vm_name(&name)?,
                    reset,
                },
            )
        }
        ReplCmd::Status {
            name,
            watch,
            watch_for,
        } => {
            let name = name.map(|n| vm_name(&n)).transpose()?;
            if watch {
                return watch_status(dd, json, name, watch_for);
            }
            Request::ReplicationStatus { name }
        }
        ReplCmd::Pause { names } => {
            return each(dd, json, &names, |name| Request::ReplicationPause { name })
        }
        ReplCmd::Set(a) => {
            let change = vmrepl_types::replication::SettingsChange {
                frequency_secs: a.frequency,
                recovery_points: a.recovery_points,
                recovery_point_interval_secs: a.point_interval,
                app_consistent_hours: a.app_consistent_hours,
                compression: a.compression,
                resync: a.resync,
                bandwidth_limit: a.bandwidth,
                replica_server: a.replica_server,
                replica_host_name: a.replica_name,
                exclude_disks: None,
                include_disk: a.include_disk,
                exclude_disk: a.exclude_disk,
            };
            return each(dd, json, &a.names, |name| Request::ReplicationSet {
                name,
                change: change.clone(),
            });
        }
        ReplCmd::Import { name, from } => Request::ReplicationImport {
            name: vm_name(&name)?,
            from: std::path::absolute(&from)?,
        },
        ReplCmd::Now {
            names,
            app_consistent,
        } => {
            return each(dd, json, &names, |name| Request::ReplicationNow {
                name,
                app_consistent,
            })
        }
        ReplCmd::Resume {
            names,
            resynchronize,
        } => {
            return each(dd, json, &names, |name| Request::ReplicationResume {
                name,
                resynchronize,
            })
        }
        ReplCmd::Remove {
            names,
            delete_replica,
        } => {
            return each(dd, json, &names, |name| Request::ReplicationRemove {
                name,
                delete_replica,
            })
        }
    };
    call(dd, json, req)
}

/// Sends one request per VM of `names`, in order, each answered as it comes; a VM that fails
/// does not stop the others. The exit code is the first failure's (0 when all succeeded).
fn each(
    dd: &DataDir,
    json: bool,
    names: &[String],
    req: impl Fn(VmName) -> Request,
) -> Result<ExitCode> {
    let names = names
        .iter()
        .map(|n| vm_name(n))
        .collect::<Result<Vec<_>>>()?;
    let mut code = ExitCode::SUCCESS;
    for name in names {
        let c = call(dd, json, req(name))?;
        if code == ExitCode::SUCCESS {
            code = c;
        }
    }
    Ok(code)
}

impl SettingsArgs {
    fn into_settings(self, replica_server: &str) -> vmrepl_types::replication::ReplicationSettings {
        use vmrepl_types::replication::InitialReplication;
        let mut settings = vmrepl_types::replication::ReplicationSettings::new(replica_server);
        settings.replica_host_name = self.replica_name;
        settings.frequency_secs = self.frequency;
        settings.recovery_points = self.recovery_points;
        settings.recovery_point_interval_secs = self.point_interval;
        settings.compression = !self.no_compression;
        settings.exclude_disks = self.exclude_disk;
        settings.app_consistent_hours = self.app_consistent_hours;
        settings.resync = self.resync;
        settings.bandwidth_limit = self.bandwidth.filter(|b| *b > 0);
        if let Some(t) = self.initial_at {
            settings.initial = InitialReplication::NetworkAt { unix_secs: t };
        }
        if let Some(folder) = self.initial_export {
            settings.initial = InitialReplication::Export {
                folder: std::path::absolute(&folder).unwrap_or(folder),
            };
        }
        if self.initial_existing_copy {
            settings.initial = InitialReplication::ExistingCopy;
        }
        settings
    }
}

fn failover(dd: &DataDir, json: bool, f: FailoverCmd) -> Result<ExitCode> {
    let req = match f {
        FailoverCmd::Prepare { name } => Request::FailoverPrepare {
            name: vm_name(&name)?,
        },
        FailoverCmd::Start {
            name,
            point,
            start,
            risk_split_brain,
            network,
        } => Request::FailoverStart {
            name: vm_name(&name)?,
            point,
            start,
            risk_split_brain,
            network,
        },
        FailoverCmd::Test {
            name,
            point,
            test_network,
        } => Request::FailoverTest {
            name: vm_name(&name)?,
            point,
            test_network,
        },
        FailoverCmd::StopTest { name } => Request::FailoverStopTest {
            name: vm_name(&name)?,
        },
        FailoverCmd::Cancel { name } => Request::FailoverCancel {
            name: vm_name(&name)?,
        },
        FailoverCmd::Complete { name, yes } => {
            let name = vm_name(&name)?;
            if !yes && !confirm(&format!(
                "Completing the failover of {name} deletes its other recovery points for good. Type yes to go on: "
            ))? {
                anyhow::bail!("not completed: the answer was not \"yes\" (use --yes in scripts)");
            }
            Request::FailoverComplete { name }
        }
    };
    call(dd, json, req)
}

/// Asks on the terminal; anything but "yes" is a no.
fn confirm(question: &str) -> Result<bool> {
    use std::io::Write;
    eprint!("{question}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

/// Shows the status every second until every relationship replicates with Normal health.
fn watch_status(dd: &DataDir, json: bool, name: Option<VmName>, secs: u64) -> Result<ExitCode> {
    use vmrepl_types::replication::{Health, ReplicationState};
    dd.require_host()?;
    let rt = runtime()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let resp = rt.block_on(async {
            let mut c = Client::connect(dd.root(), &dd.socket()).await?;
            c.call(&Request::ReplicationStatus { name: name.clone() })
                .await
        })?;
        let done = match &resp {
            Response::Replication { relationships } => {
                !relationships.is_empty()
                    && relationships.iter().all(|r| {
                        r.state == ReplicationState::Replicating && r.health == Health::Normal
                    })
            }
            Response::Error(_) => {
                return Ok(crate::render::response(&resp));
            }
            _ => false,
        };
        if json {
            println!("{}", serde_json::to_string(&resp)?);
        } else {
            println!(
                "--- {}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            );
            crate::render::response(&resp);
        }
        if done {
            return Ok(ExitCode::SUCCESS);
        }
        if std::time::Instant::now() > deadline {
            bail!("replication did not reach Replicating with Normal health within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn create_request(c: CreateArgs) -> Result<CreateVm> {
    let generation = Generation::try_from(c.generation).map_err(|e| anyhow!(e))?;
    let mut disks = Vec::new();
    for d in &c.disk {
        disks.push(DiskSpec::New {
            size_bytes: parse_size(d)?,
            folder: c.folder.clone(),
        });
    }
    for i in c.import {
        let source =
            std::path::absolute(&i).with_context(|| format!("resolving {}", i.display()))?;
        disks.push(DiskSpec::Import {
            source,
            folder: c.folder.clone(),
        });
    }
    let nics = c
        .nic
        .iter()
        .map(|n| parse_nic(n))
        .collect::<Result<Vec<_>>>()?;
    let abs = |p: Option<PathBuf>| -> Result<Option<PathBuf>> {
        p.map(|p| std::path::absolute(&p).map_err(|e| anyhow!("resolving {}: {e}", p.display())))
            .transpose()
    };
    Ok(CreateVm {
        name: c.name,
        generation,
        secure_boot: c.secure_boot,
        machine_type: c.machine,
        vcpus: c.cpus,
        memory_mib: c.memory,
        disks,
        nics,
        kernel: abs(c.kernel)?,
        initrd: abs(c.initrd)?,
        cmdline: c.cmdline,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `vmrepl doctor`: the findings, and exit 1 when one of them blocks replication.
fn doctor(
    dd: &DataDir,
    json: bool,
    vm: Option<String>,
    replica_server: Option<String>,
    replica_name: Option<String>,
) -> Result<ExitCode> {
    dd.require_host()?;
    let req = Request::Doctor {
        vm: vm.map(|v| vm_name(&v)).transpose()?,
        replica_server,
        replica_name,
    };
    let resp = runtime()?.block_on(async {
        let mut c = Client::connect(dd.root(), &dd.socket()).await?;
        c.call(&req).await
    })?;
    let Response::Doctor { findings } = &resp else {
        if json {
            println!("{}", serde_json::to_string_pretty(&resp)?);
        }
        return Ok(crate::render::response(&resp));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else {
        crate::render::findings(findings);
    }
    let blocked = findings
        .iter()
        .any(|f| f.status == vmrepl_types::api::FindingStatus::Fail);
    Ok(if blocked {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `vmrepl events`: one request, or with `follow` one every second for what is new.
fn events(
    dd: &DataDir,
    json: bool,
    vm: Option<String>,
    since: Option<String>,
    limit: u32,
    follow: bool,
) -> Result<ExitCode> {
    let vm = vm.map(|v| vm_name(&v)).transpose()?;
    let since_ms = since.map(|s| parse_since(&s, now_unix_ms())).transpose()?;
    if !follow {
        return call(
            dd,
            json,
            Request::Events {
                vm,
                since_ms,
                after_id: None,
                limit: Some(limit),
            },
        );
    }
    dd.require_host()?;
    let rt = runtime()?;
    let mut after: Option<i64> = None;
    loop {
        let req = Request::Events {
            vm: vm.clone(),
            since_ms,
            after_id: after,
            limit: Some(if after.is_some() { 10_000 } else { limit }),
        };
        let resp = rt.block_on(async {
            let mut c = Client::connect(dd.root(), &dd.socket()).await?;
            c.call(&req).await
        })?;
        match &resp {
            Response::Events { events } => {
                for e in events {
                    if json {
                        println!("{}", serde_json::to_string(e)?);
                    } else {
                        crate::render::event_line(e);
                    }
                    after = Some(e.id);
                }
                if after.is_none() {
                    after = Some(0);
                }
                use std::io::Write;
                std::io::stdout().flush()?;
            }
            other => return Ok(crate::render::response(other)),
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `--since`: a duration back from `now_ms` (`90s`, `30m`, `12h`, `7d`), a UTC time
/// (`2026-12-06T04:30:00Z`, `2026-12-06 04:30[:00]`) or Unix milliseconds.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64> {
    let t = s.trim();
    if let Some((n, unit)) = t
        .find(|c: char| !c.is_ascii_digit())
        .filter(|i| *i > 0)
        .map(|i| t.split_at(i))
    {
        let secs_per = match unit {
            "s" => Some(1u64),
            "m" => Some(60),
            "h" => Some(3600),
            "d" => Some(86_400),
            _ => None,
        };
        if let (Some(per), Ok(n)) = (secs_per, n.parse::<u64>()) {
            return Ok(now_ms.saturating_sub(n.saturating_mul(per).saturating_mul(1000)));
        }
    }
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().map_err(|e| anyhow!("--since {t}: {e}"));
    }
    let iso = t.trim_end_matches('Z').replace('T', " ");
    let with_secs = if iso.len() == 16 {
        format!("{iso}:00")
    } else {
        iso
    };
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    match time::PrimitiveDateTime::parse(&with_secs, &fmt) {
        Ok(p) => Ok((p.assume_utc().unix_timestamp_nanos() / 1_000_000).max(0) as u64),
        Err(_) => bail!(
            "--since {t:?} is not a time: give a duration back from now (90s, 30m, 12h, 7d), \
             a UTC time (2026-12-06T04:30:00Z or \"2026-12-06 04:30\") or Unix milliseconds"
        ),
    }
}

/// Sends one request to the daemon and renders the answer.
pub fn call(dd: &DataDir, json: bool, req: Request) -> Result<ExitCode> {
    dd.require_host()?;
    let resp = runtime()?.block_on(async {
        let mut c = Client::connect(dd.root(), &dd.socket()).await?;
        c.call(&req).await
    })?;
    if json {
        match &resp {
            Response::Error(e) => {
                println!("{}", serde_json::to_string_pretty(&resp)?);
                return Ok(crate::render::exit_code(e.code));
            }
            _ => println!("{}", serde_json::to_string_pretty(&resp)?),
        }
        return Ok(ExitCode::SUCCESS);
    }
    Ok(crate::render::response(&resp))
}

/// `host revoke-cert`: through the daemon when it runs (in force at once), else straight into
/// the state database (in force when the daemon starts).
fn revoke_cert(
    dd: &DataDir,
    json: bool,
    fingerprint: Option<String>,
    cert: Option<PathBuf>,
    reason: Option<String>,
) -> Result<ExitCode> {
    dd.require_host()?;
    let (fingerprint, subject) = match (fingerprint, cert) {
        (Some(f), _) => (f, None),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let s = vmrepl_transport::pki::describe(&text)?;
            (s.fingerprint_sha256, Some(s.subject))
        }
        (None, None) => bail!("name the certificate: a FINGERPRINT or --cert FILE"),
    };
    let fp = vmrepl_transport::cert::normalize_fingerprint(&fingerprint).map_err(|e| anyhow!(e))?;
    let req = Request::HostRevokeCert {
        fingerprint: fp.clone(),
        reason: reason.clone(),
        subject: subject.clone(),
    };
    let daemon = runtime()?.block_on(Client::connect(dd.root(), &dd.socket()));
    if daemon.is_ok() {
        return call(dd, json, req);
    }
    let db = vmrepl_host::host_settings::revoke_offline(dd, &fp, reason, subject)?;
    println!(
        "revoked the certificate {fp} in {} (the daemon is not running; it refuses the \
         certificate from its next start)",
        db.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `host unrevoke-cert`: through the daemon when it runs, else straight into the state database.
fn unrevoke_cert(dd: &DataDir, json: bool, fingerprint: &str) -> Result<ExitCode> {
    dd.require_host()?;
    let fp = vmrepl_transport::cert::normalize_fingerprint(fingerprint).map_err(|e| anyhow!(e))?;
    if runtime()?
        .block_on(Client::connect(dd.root(), &dd.socket()))
        .is_ok()
    {
        return call(dd, json, Request::HostUnrevokeCert { fingerprint: fp });
    }
    let db = vmrepl_host::host_settings::unrevoke_offline(dd, &fp)?;
    println!(
        "the certificate {fp} is no longer revoked in {} (the daemon is not running; it \
         accepts the certificate again from its next start)",
        db.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn start_background(dd: &DataDir) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the vmrepl binary")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dd.log_file())
        .with_context(|| format!("opening {}", dd.log_file().display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--data").arg(dd.root());
    if dd.config_given() {
        cmd.arg("--config").arg(dd.config());
    }
    cmd.arg("daemon")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let mut child = cmd.spawn().context("starting the daemon")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let rt = runtime()?;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the daemon exited at once ({status}); its log {} says:\n{}",
                dd.log_file().display(),
                tail_file(&dd.log_file(), 2000)
            );
        }
        let ok = rt.block_on(async {
            match Client::connect(dd.root(), &dd.socket()).await {
                Ok(mut c) => matches!(c.call(&Request::Ping).await, Ok(Response::Ok { .. })),
                Err(_) => false,
            }
        });
        if ok {
            println!(
                "daemon started (pid {}), log: {}",
                child.id(),
                dd.log_file().display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the daemon did not answer within 30 s; see {}",
                dd.log_file().display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn tail_file(p: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let start = s.len().saturating_sub(n);
    s[s.floor_char_boundary(start)..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_back_utc_times_and_unix_milliseconds() {
        let now = 1_765_000_000_000; // 2025-12-06 05:46:40 UTC
        assert_eq!(parse_since("90s", now).unwrap(), now - 90_000);
        assert_eq!(parse_since("30m", now).unwrap(), now - 1_800_000);
        assert_eq!(parse_since("12h", now).unwrap(), now - 43_200_000);
        assert_eq!(parse_since("7d", now).unwrap(), now - 604_800_000);
        assert_eq!(parse_since("1765000000000", now).unwrap(), now);
        assert_eq!(parse_since("2025-12-06T05:46:40Z", now).unwrap(), now);
        assert_eq!(parse_since("2025-12-06 05:46", now).unwrap(), now - 40_000);
        let e = parse_since("last tuesday", now).unwrap_err().to_string();
        assert!(e.contains("is not a time") && e.contains("12h"), "{e}");
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn nics_parse_and_unknown_kinds_are_explained() {
        assert_eq!(parse_nic("user").unwrap(), NicMode::User);
        assert_eq!(parse_nic("none").unwrap(), NicMode::NotConnected);
        assert_eq!(
            parse_nic("tap:tap0").unwrap(),
            NicMode::Tap {
                ifname: "tap0".into()
            }
        );
        assert!(parse_nic("wifi")
            .unwrap_err()
            .to_string()
            .contains("tap:IFNAME"));
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
