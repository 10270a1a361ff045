//! What the replica-server tests share: a real replica daemon (`daemon::run`, QEMU capability
//! probe with TCG) in a temporary data folder on a loopback port the OS gives, with a
//! certificate of its own, and the primary's side of a Hello.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;
use vmrepl_host::config::HostConfig;
use vmrepl_host::datadir::DataDir;
use vmrepl_host::init::{init_host, InitOptions};
use vmrepl_types::HostInfo;

/// A free TCP port on 127.0.0.1, as the OS hands it out.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a test primary says of itself in its Hello.
pub fn my_info(host: &str) -> HostInfo {
    serde_json::from_value(serde_json::json!({
        "host_name": host,
        "release": "test",
        "protocol_versions": [1, 1],
        "qemu_version": "test",
        "machine_types": [],
        "firmware": [],
        "kvm_usable": false,
        "kvm_reason": null,
        "config_versions": [{"major": 1, "minor": 0}, {"major": 1, "minor": 0}],
        "storage": [],
    }))
    .unwrap()
}

/// A replica host to start: its data folder, name, certificate and key, the CAs it trusts.
pub struct ReplicaHost {
    pub dd: DataDir,
    pub name: String,
    pub cert: (PathBuf, PathBuf),
    pub trust: Vec<PathBuf>,
}

impl ReplicaHost {
    /// Initializes the host on a free loopback port, enables its replica server for listed
    /// primaries only, lets `setup` change its configuration, starts its daemon and waits
    /// until its peer port answers. Returns the address and the daemon's task.
    pub async fn start(
        self,
        setup: impl FnOnce(&mut HostConfig),
    ) -> (String, tokio::task::JoinHandle<()>) {
        let addr = format!("127.0.0.1:{}", free_port());
        init_host(
            &self.dd,
            InitOptions {
                host_name: self.name.clone(),
                listen: addr.clone(),
                advertise: None,
                storage: vec![],
                accel: vmrepl_types::Accel::Tcg,
                cert: Some(self.cert.clone()),
                trust: self.trust.clone(),
                qemu_binary: None,
                metrics: String::new(),
                dashboard: String::new(),
            },
        )
        .unwrap();
        let mut cfg = HostConfig::load(&self.dd.config()).unwrap();
        cfg.replica_server.enabled = true;
        cfg.replica_server.allow_any = false;
        setup(&mut cfg);
        cfg.save(&self.dd.config()).unwrap();
        let dd = self.dd.clone();
        let daemon = tokio::spawn(async move {
            if let Err(e) = vmrepl_host::daemon::run(dd).await {
                panic!("replica daemon failed: {e}");
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(!daemon.is_finished(), "the daemon stopped");
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (addr, daemon)
    }
}
