//! The handshake: the primary sends [`Hello`]; the backup answers [`Welcome`] or [`Reject`].
//!
//! ```text
//!  primary                                   backup
//!  Hello{min..max, mode, vm_id, layout, base} --->   answer_hello(hello, local)
//!       <--- Welcome{version, resumed, epoch, digest}   the session goes on at `version`
//!       <--- Reject{code, reason}                       the backup closes the connection
//! ```
//!
//! Checks, in order: a common protocol version; the VM id; the mode; the layout (page count
//! within limits, and equal to the held image's if the backup holds one); then resume: a
//! primary that sends a `base` offers to resume (the base is the newest image it sent); a
//! backup that holds an image answers `resumed` with that image's epoch and digest, and the
//! primary sends only what differs from it, or, if it does not know that image, closes and
//! says hello again without a base. Without a base, or without a held image, the backup resets
//! its image to zeros and the primary sends everything (a full sync).

use crate::digest::PageTree;
use crate::limits::Limits;
use crate::message::{
    EpochDigest, Hello, MemoryLayout, Message, Mode, Reject, RejectCode, Welcome,
};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// What the backup side knows and wants, to answer a [`Hello`].
#[derive(Clone, Debug)]
pub struct LocalEnd {
    /// Oldest protocol version this end accepts.
    pub min_version: u16,
    /// Newest protocol version this end speaks.
    pub max_version: u16,
    /// The VM this backup serves.
    pub vm_id: String,
    /// Modes this backup accepts.
    pub modes: Vec<Mode>,
    /// The image this backup holds (e.g. persisted), if any: its layout and epoch/digest.
    pub held: Option<(MemoryLayout, EpochDigest)>,
    /// Bounds (`max_image_pages`, `max_regions`).
    pub limits: Limits,
}

impl LocalEnd {
    /// A backup for `vm_id` with this build's versions, both modes, nothing held.
    pub fn new(vm_id: impl Into<String>) -> Self {
        LocalEnd {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            vm_id: vm_id.into(),
            modes: vec![Mode::Protect, Mode::Migrate, Mode::Postcopy],
            held: None,
            limits: Limits::default(),
        }
    }
}

/// Reason text for a peer speaking `peer_min..=peer_max` that this build cannot talk to.
pub(crate) fn version_reason(peer_min: u16, peer_max: u16, who: &str) -> String {
    let advice = if peer_min > PROTOCOL_VERSION {
        format!("upgrade {who}")
    } else {
        "upgrade the peer".to_string()
    };
    let theirs = if peer_min == peer_max {
        format!("protocol version {peer_max} is")
    } else {
        format!("protocol versions {peer_min}..{peer_max} are")
    };
    format!(
        "{theirs} not supported by {who} (it speaks {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}); \
         {advice}"
    )
}

fn describe(layout: &MemoryLayout) -> String {
    let n = layout.regions.len();
    format!(
        "{} region{} / {} pages",
        n,
        if n == 1 { "" } else { "s" },
        layout.total_pages()
    )
}

fn reject(code: RejectCode, reason: String) -> Message {
    Message::Reject(Reject { code, reason })
}

/// Answers a received `Hello`: a [`Message::Welcome`] or a [`Message::Reject`] whose reason
/// says what a person should do.
pub fn answer_hello(hello: &Hello, local: &LocalEnd) -> Message {
    // Version: the highest both speak.
    let lo = hello.min_version.max(local.min_version);
    let hi = hello.max_version.min(local.max_version);
    if hello.min_version == 0 || hello.min_version > hello.max_version || lo > hi {
        let advice = if hello.min_version > local.max_version {
            "upgrade the backup"
        } else {
            "upgrade the primary"
        };
        let theirs = if hello.min_version == hello.max_version {
            format!("protocol version {} is", hello.max_version)
        } else {
            format!(
                "protocol versions {}..{} are",
                hello.min_version, hello.max_version
            )
        };
        return reject(
            RejectCode::Version,
            format!(
                "{theirs} not supported by this backup (it speaks {}..{}); {advice}",
                local.min_version, local.max_version
            ),
        );
    }
    if hello.vm_id != local.vm_id {
        return reject(
            RejectCode::VmId,
            format!(
                "this backup serves VM {:?}, not {:?}; point the primary at the backup of {:?} \
                 or start a backup with --vm-id {:?}",
                local.vm_id, hello.vm_id, hello.vm_id, hello.vm_id
            ),
        );
    }
    if !local.modes.contains(&hello.mode) {
        return reject(
            RejectCode::Mode,
            format!(
                "this backup does not accept mode {:?} (it accepts {:?}); change the request or \
                 the backup's configuration",
                hello.mode, local.modes
            ),
        );
    }
    let pages = hello.layout.total_pages();
    if hello.layout.regions.is_empty() || pages == 0 {
        return reject(
            RejectCode::Layout,
            "the primary announced no guest memory; check the primary's VM configuration".into(),
        );
    }
    if pages > local.limits.max_image_pages || pages > u64::from(u32::MAX) {
        return reject(
            RejectCode::Layout,
            format!(
                "the guest has {pages} pages, over this backup's limit of {} pages; raise the \
                 backup's max_image_pages or give the guest less memory",
                local.limits.max_image_pages
            ),
        );
    }
    if let Some((layout, _)) = &local.held {
        if *layout != hello.layout && hello.base.is_some() {
            return reject(
                RejectCode::Layout,
                format!(
                    "the primary's memory layout ({}) differs from the image this backup holds \
                     ({}); start the primary with the same memory size or the backup without \
                     its persisted image",
                    describe(&hello.layout),
                    describe(layout)
                ),
            );
        }
    }
    let resume = match (&local.held, hello.base) {
        (Some((layout, held)), Some(_offer)) if *layout == hello.layout => Some(*held),
        _ => None,
    };
    Message::Welcome(match resume {
        Some(held) => Welcome {
            version: hi,
            resumed: true,
            epoch: held.epoch,
            digest: held.digest,
        },
        None => Welcome {
            version: hi,
            resumed: false,
            epoch: 0,
            digest: PageTree::zeroed_digest(pages as u32),
        },
    })
}
