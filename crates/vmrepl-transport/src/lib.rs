//! # vmrepl-transport
//!
//! How vmrepl hosts find out who they are talking to, whether to let them in,
//! and how bytes travel between them.
//!
//! ## Trust model
//!
//! Like Hyper-V Replica's certificate authentication, every host has **one
//! host certificate** whose DNS subject alternative name is the host's FQDN
//! and whose extended key usages are **both serverAuth and clientAuth**: a host
//! is a TLS server when it is the replica server and a TLS client when it is
//! the primary. Each host also has a list of **trusted CAs**. Nothing else is
//! trusted: no system root store, no trust on first use.
//!
//! * **Identity** comes only from a certificate that verified: the
//!   connecting primary checks that the replica server's certificate chains
//!   to a trusted CA, is within its validity period, carries serverAuth and
//!   names the host it meant to reach. The replica server requires a client
//!   certificate that chains to a trusted CA, is within its validity period
//!   and carries clientAuth. The peer's host name ([`tls::PeerIdentity`]) is
//!   the first (non-wildcard) DNS name of its verified certificate, and its
//!   fingerprint is the certificate's SHA-256.
//! * **Authorization** is a separate, later step on the replica server
//!   ([`authz::Authorization::authorize`]): a trusted certificate proves *who*
//!   the primary is; the authorization entries say whether that host may
//!   replicate here, where its replicas are stored and which trust group it
//!   belongs to (Hyper-V's `AllowedPrimaryServer`, `ReplicaStorageLocation`,
//!   `TrustGroup`, and "allow replication from any authenticated server" with
//!   trust group `DEFAULT`).
//! * **Scoping and revocation**: an authorization entry may name the CA that
//!   must vouch for the primary (`issuer`, checked against the CA path in
//!   [`tls::PeerIdentity::ca_fingerprints`]) and the primary's exact
//!   certificate (`pin`). [`pki::HostIdentity::set_revoked`] holds a denylist
//!   of certificate fingerprints refused at every handshake, in and out; the
//!   trusted CAs can be replaced at run time with
//!   [`pki::HostIdentity::reload_trust`] and [`tls::Listener::reload`].
//! * **Limits**: the [`tls::Listener`] caps connections and handshakes in
//!   progress (in all and per address, see [`tls::Limits`]) and every peer
//!   socket has TCP keepalive.
//! * **PKI without a domain**: [`pki::Ca`] is a complete CA in a folder
//!   (`ca.pem`, `ca-key.pem` mode 0600). Create it on one host, issue a
//!   certificate per host, copy `ca.pem` to every host as its trusted CA.
//!   Certificates from any other CA can be imported with
//!   [`pki::HostIdentity::import`] if they meet the same rules.
//!
//! Every refusal names its exact cause: an expired certificate (with its
//! end date), one not yet valid (with its start date), one from an unknown CA
//! (with its issuer and the trusted CAs), a name mismatch (the expected name
//! and the names in the certificate), a missing client certificate, a missing
//! extended key usage. The server logs which client it refused and why; the
//! client learns whether the server's certificate was wrong ("the replica
//! server …'s certificate is not acceptable: …") or whether the server refused
//! ours ("the replica server … refused our certificate …: …").
//!
//! ## Wire
//!
//! After the handshake (and the server's one-byte admission, see [`tls`]),
//! both sides exchange the preamble and then frames, see [`frame`].

pub mod authz;
pub mod cert;
pub mod frame;
pub mod pki;
pub mod tls;

pub use authz::{Authorization, AuthzEntry, AuthzError, Grant, HostPattern};
pub use cert::{CertProblem, CertSummary};
pub use frame::{Frame, FrameError, FrameKind, Framed, VersionRange};
pub use pki::{describe, Ca, HostCertSpec, HostIdentity, IssuedCert, PkiError};
pub use tls::{connect, Listener, PeerIdentity, TlsError, TlsStream};
