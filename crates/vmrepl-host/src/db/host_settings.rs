//! The `host_settings` table (migration 13): the host's own settings that commands change at
//! run time (see `crate::host_settings`), one row per setting, its value as JSON in a shape
//! named by `format`. A row in a format this release does not know is refused, not guessed.

use super::{now_ms, Db, DbError};
use rusqlite::{params, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vmrepl_types::replication::{ReplicaServerSettings, RevokedCert};

/// The settings commands change, as stored (`crate::host_settings` has what uses them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSettings {
    pub replica_server: ReplicaServerSettings,
    pub revoked_certs: Vec<RevokedCert>,
}

/// The shape of the JSON this release writes (and the newest it reads).
pub const HOST_SETTINGS_FORMAT: i64 = 1;

/// The row of the replica server settings.
const REPLICA_SERVER: &str = "replica_server";
/// The row of the revoked peer certificates.
const REVOKED_CERTS: &str = "revoked_certs";

impl Db {
    /// The host settings stored, or None when none are yet (a host whose daemon never started
    /// since this release, see `crate::host_settings::load`). A missing row reads as its
    /// default.
    pub fn host_settings(&self) -> Result<Option<HostSettings>, DbError> {
        let replica_server: Option<ReplicaServerSettings> = self.host_setting(REPLICA_SERVER)?;
        let revoked_certs: Option<Vec<RevokedCert>> = self.host_setting(REVOKED_CERTS)?;
        if replica_server.is_none() && revoked_certs.is_none() {
            return Ok(None);
        }
        Ok(Some(HostSettings {
            replica_server: replica_server.unwrap_or_default(),
            revoked_certs: revoked_certs.unwrap_or_default(),
        }))
    }

    /// Stores the replica server settings.
    pub fn store_replica_server(&self, s: &ReplicaServerSettings) -> Result<(), DbError> {
        self.put_host_setting(REPLICA_SERVER, s)
    }

    /// Stores the revoked peer certificates.
    pub fn store_revoked_certs(&self, r: &[RevokedCert]) -> Result<(), DbError> {
        self.put_host_setting(REVOKED_CERTS, &r)
    }

    /// Stores every host setting at once, with `note` journaled in the same transaction when
    /// given: the first settings of a host, imported from its configuration file or defaults.
    pub fn store_host_settings(&self, s: &HostSettings, note: Option<&str>) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction()?;
        self.put_host_setting(REPLICA_SERVER, &s.replica_server)?;
        self.put_host_setting(REVOKED_CERTS, &s.revoked_certs)?;
        if let Some(n) = note {
            self.event(None, n)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn host_setting<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, DbError> {
        let Some((format, value)) = self
            .conn
            .query_row(
                "SELECT format, value FROM host_settings WHERE name = ?1",
                params![name],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?
        else {
            return Ok(None);
        };
        if format > HOST_SETTINGS_FORMAT {
            return Err(DbError::Setting {
                name: name.into(),
                reason: format!(
                    "it is stored in format {format}, newer than this vmrepl reads \
                     ({HOST_SETTINGS_FORMAT}); run a newer vmrepl release on this host"
                ),
            });
        }
        serde_json::from_str(&value)
            .map(Some)
            .map_err(|e| DbError::Setting {
                name: name.into(),
                reason: format!("{e}; the database may be damaged"),
            })
    }

    fn put_host_setting<T: Serialize + ?Sized>(&self, name: &str, v: &T) -> Result<(), DbError> {
        let value = serde_json::to_string(v).map_err(|e| DbError::Setting {
            name: name.into(),
            reason: e.to_string(),
        })?;
        self.conn.execute(
            "INSERT INTO host_settings (name, format, value, changed_ms) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET format = excluded.format, value = excluded.value, \
             changed_ms = excluded.changed_ms",
            params![name, HOST_SETTINGS_FORMAT, value, now_ms() as i64],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revoked(fp: char) -> RevokedCert {
        RevokedCert {
            fingerprint: fp.to_string().repeat(64),
            reason: Some("lost".into()),
            subject: None,
            revoked_at_unix: 7,
        }
    }

    #[test]
    fn host_settings_are_none_until_stored_then_round_trip_and_change_per_row() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        assert_eq!(db.host_settings().unwrap(), None);
        let mut s = HostSettings::default();
        s.replica_server.enabled = true;
        s.replica_server.default_storage = Some("/srv/replica".into());
        s.revoked_certs.push(revoked('A'));
        db.store_host_settings(&s, Some("imported")).unwrap();
        assert_eq!(db.host_settings().unwrap(), Some(s.clone()));
        let ev = db.events(None, None, None, 10).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].message, "imported");

        s.revoked_certs.push(revoked('B'));
        db.store_revoked_certs(&s.revoked_certs).unwrap();
        s.replica_server.enabled = false;
        db.store_replica_server(&s.replica_server).unwrap();
        drop(db);
        let db = Db::open(&d.path().join("s.db")).unwrap();
        assert_eq!(db.host_settings().unwrap(), Some(s));
    }

    #[test]
    fn a_setting_in_a_newer_format_is_refused_and_names_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        db.store_revoked_certs(&[]).unwrap();
        db.conn
            .execute("UPDATE host_settings SET format = 99", [])
            .unwrap();
        let e = db.host_settings().unwrap_err().to_string();
        assert!(
            e.contains("revoked_certs") && e.contains("newer vmrepl"),
            "{e}"
        );
    }
}
