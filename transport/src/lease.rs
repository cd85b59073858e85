//! The VM's lease: a node may run the VM only while it holds it. The built-in witness
//! (`understudy witness`) grants it; [`LeaseBackend`] keeps the door open for another arbiter
//! (an etcd lease, say).
//!
//! Safety rule for callers: a grant obtained by a request *sent* at `t` is valid until
//! `t + ttl - margin` on the caller's monotonic clock. The witness counts the lease from when it
//! *received* the request, which is later, so the caller's view always ends first.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use understudy_protocol::{Lease, LeaseReply, Limits, Message, Successor};

use crate::endpoint::{Connection, Endpoint};
use crate::messages;
use crate::stream::{FrameReader, FrameSender};

/// A lease request that did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The witness could not be reached.
    #[error("cannot reach the witness: {0}")]
    Unreachable(String),
    /// No answer in time.
    #[error("the witness did not answer within {0:?}")]
    Timeout(Duration),
    /// The witness answered with something else.
    #[error("unexpected answer from the witness: {0}")]
    Protocol(String),
}

/// The outcome of a granted or refused request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// Whether we hold the lease.
    pub granted: bool,
    /// Who holds it.
    pub holder: String,
    /// Until when we may run the VM (only meaningful if granted): send time + ttl - margin.
    pub valid_until: Instant,
    /// If refused: how long the holder's lease still runs.
    pub remaining: Duration,
}

/// Something that grants leases.
pub trait LeaseBackend: Send {
    /// Acquires or renews the lease for `ttl`; once it expires, only `successor` may take it.
    fn request(
        &mut self,
        ttl: Duration,
        successor: &Successor,
    ) -> impl Future<Output = Result<LeaseState, LeaseError>> + Send;
}

/// A lease from the built-in witness over mutual-TLS QUIC.
pub struct WitnessLease {
    conn: Connection,
    tx: FrameSender,
    rx: FrameReader,
    vm_id: String,
    holder: String,
    seq: u64,
    limits: Limits,
    /// Subtracted from every grant to absorb clock-rate differences.
    pub margin: Duration,
    /// How long to wait for an answer.
    pub timeout: Duration,
    /// A timed-out exchange may have left half a frame unread: the stream is unusable after it.
    broken: bool,
}

impl WitnessLease {
    /// Connects to the witness at `addr` (certificate name `name`).
    pub async fn connect(
        endpoint: &Endpoint,
        addr: SocketAddr,
        name: &str,
        vm_id: &str,
    ) -> Result<Self, LeaseError> {
        let limits = Limits::default();
        let conn = endpoint
            .connect(addr, name)
            .await
            .map_err(|e| LeaseError::Unreachable(e.to_string()))?;
        let (tx, rx) = conn
            .open_control(limits.max_frame_len)
            .await
            .map_err(|e| LeaseError::Unreachable(e.to_string()))?
            .split();
        Ok(WitnessLease {
            conn,
            tx,
            rx,
            vm_id: vm_id.to_string(),
            holder: endpoint.name().to_string(),
            seq: 0,
            limits,
            margin: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            broken: false,
        })
    }

    /// The connection to the witness.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Whether the link to the witness is gone or unusable (reconnect then).
    pub fn is_broken(&self) -> bool {
        self.broken || self.conn.close_reason().is_some()
    }

    async fn exchange(
        &mut self,
        ttl: Duration,
        successor: &Successor,
    ) -> Result<LeaseReply, LeaseError> {
        self.seq += 1;
        let msg = Message::Lease(Lease {
            vm_id: self.vm_id.clone(),
            holder: self.holder.clone(),
            ttl_ms: ttl.as_millis().min(u32::MAX as u128) as u32,
            seq: self.seq,
            successor: successor.clone(),
        });
        messages::send(&mut self.tx, &msg)
            .await
            .map_err(|e| LeaseError::Unreachable(e.to_string()))?;
        loop {
            let frame = self
                .rx
                .read_frame()
                .await
                .map_err(|e| LeaseError::Unreachable(e.to_string()))?
                .ok_or_else(|| LeaseError::Unreachable("the witness closed the stream".into()))?;
            match messages::decode(&frame, &self.limits) {
                Ok(Message::LeaseReply(r)) if r.seq == self.seq => return Ok(r),
                Ok(Message::LeaseReply(_)) => continue, // an answer to an abandoned request
                Ok(other) => return Err(LeaseError::Protocol(format!("{:?}", other.kind()))),
                Err(e) => return Err(LeaseError::Protocol(e.to_string())),
            }
        }
    }
}

impl LeaseBackend for WitnessLease {
    async fn request(
        &mut self,
        ttl: Duration,
        successor: &Successor,
    ) -> Result<LeaseState, LeaseError> {
        if self.broken {
            return Err(LeaseError::Unreachable(
                "an earlier request timed out; reconnect to the witness".into(),
            ));
        }
        let sent = Instant::now();
        let reply = match tokio::time::timeout(self.timeout, self.exchange(ttl, successor)).await {
            Ok(r) => r?,
            Err(_) => {
                self.broken = true;
                return Err(LeaseError::Timeout(self.timeout));
            }
        };
        let granted_for = Duration::from_millis(reply.ttl_ms.into());
        Ok(LeaseState {
            granted: reply.granted,
            holder: reply.holder,
            valid_until: sent + granted_for.saturating_sub(self.margin),
            remaining: if reply.granted {
                Duration::ZERO
            } else {
                granted_for
            },
        })
    }
}
