//! Deletes inferred by a full catch-up.
//!
//! A node whose cursor in a peer's log is older than the peer's tombstone
//! horizon copies the peer's snapshot instead (see `puller`). Deletes the
//! peer merged away are then missing from the copy: a key this node holds
//! as a value older than the peer's retention, and that the peer's
//! snapshot lacks, may have been deleted meanwhile. It may also never have
//! reached the peer: a caught-up puller takes from a peer only the records
//! that peer coordinated, so a write whose coordinator died before the peer
//! pulled it is on some replicas only (until anti-entropy copies it).
//!
//! The peer's absence alone therefore proves nothing. A delete is inferred
//! only when ⌈n/2⌉ of the key's n−1 other replicas, the snapshot's peer
//! being one, lack this node's version of it (no record, an older one, or
//! a tombstone or expired value). A write acknowledged at `w=quorum` or
//! `w=all` reached a majority, which has ⌊n/2⌋ members besides this node
//! and so shares one with any ⌈n/2⌉ of the n−1 others: if all of those lack
//! it, it was deleted and the delete merged away. A replica holding a live
//! copy at least as new keeps the key whatever the others say.
//!
//! A `w=one` write that only this node ever held is still taken for
//! deleted: nothing tells it apart from a delete whose tombstone is gone.
//! The count also trusts the current replicas to hold what was
//! acknowledged under earlier preference lists, which a handoff that
//! skipped an unreachable source does not guarantee.
//!
//! Replicas that do not answer decide nothing; a replica still catching up
//! does not vouch for a live value (it may not have pulled its delete yet).
//! The catch-up asks again for a while ([`MAX_ROUNDS`], not when the
//! replicas that did not answer are marked down); a key still undecided
//! then is kept, and counted
//! (`caskade_node_replication_deletes_undecided_total`). Keeping it is the
//! lesser harm than deleting a write that was acknowledged, but it is
//! lasting if the key was in fact deleted: its tombstones are gone,
//! anti-entropy never deletes, so this node keeps serving the old value,
//! and a quorum read that includes it writes it back to the others. That
//! takes two faults at once: this node away for longer than the retention,
//! and too few of the key's other replicas up when it returns.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::clock_offset::PeerChannel;
use crate::peers::PeerLinks;
use caskade_common::Version;
use caskade_proto::replication_client::ReplicationClient;
use caskade_proto::{HeldVersion, VersionsRequest};
use metrics::counter;
use prost::bytes::Bytes;
use tonic::Status;

use super::puller::channel;
use super::service::apply_now;
use super::{Placement, Replication};
use crate::engine::Record;
use crate::kv::{NodeCore, to_proto};

/// Most keys one `Versions` call may ask about.
pub const MAX_KEYS: usize = 4096;
/// One `Versions` call answers within this, or its replica counts as silent.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Rounds of asking before undecided keys are kept.
const MAX_ROUNDS: u32 = 8;
/// Pause between rounds; doubled each round.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

/// A key of the peer's ranges that its snapshot lacked and that this node
/// holds as a value written before the retention cutoff.
#[derive(Debug, Clone)]
pub struct Absent {
    /// The key.
    pub key: Vec<u8>,
    /// The version this node holds.
    pub held: Version,
}

/// What another replica holds of an [`Absent`] key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A live value at least as new as this node's: the key stays.
    Holds,
    /// No record, an older one, or a tombstone or expired value: it lacks
    /// this node's version.
    Lacks,
    /// No answer (unreachable, not ready to vouch, or still receiving the
    /// range): asking again may get one.
    Silent,
    /// Marked down in the map: asking again under it gets nothing.
    Down,
}

/// What the replicas' answers decide for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Enough of them lack it: it was deleted.
    Deleted,
    /// One holds it.
    Held,
    /// Too few answered to tell.
    Undecided,
}

/// Decides a key with `replicas` replicas (this node and the snapshot's
/// peer among them) from the other replicas' `answers`.
pub fn decide(replicas: usize, answers: impl IntoIterator<Item = Answer>) -> Decision {
    let mut lacking = 1;
    for answer in answers {
        match answer {
            Answer::Holds => return Decision::Held,
            Answer::Lacks => lacking += 1,
            Answer::Silent | Answer::Down => {}
        }
    }
    if lacking >= replicas.div_ceil(2) {
        Decision::Deleted
    } else {
        Decision::Undecided
    }
}

/// The tombstone an inferred delete writes: the cutoff's time with counter
/// and origin 0, newer than any value written before the cutoff and older
/// than anything written since, so it cannot hide a newer write.
pub fn inferred_tombstone(cutoff_ms: u64) -> Version {
    Version::from_parts(cutoff_ms, 0, 0)
}

/// The keys in `(start, end]` (`end` `None`: to the last key) that this
/// node and `peer` both replicate, that the peer's snapshot page did not
/// hold, and whose latest record here is a value written before
/// `cutoff_ms`.
pub fn absent_since(
    core: &NodeCore,
    placement: &Placement,
    peer: u32,
    start: &[u8],
    end: Option<&[u8]>,
    held: &HashSet<Bytes>,
    cutoff_ms: u64,
) -> Vec<Absent> {
    let tombstone = inferred_tombstone(cutoff_ms);
    let mut absent = Vec::new();
    let mut after = (!start.is_empty()).then(|| start.to_vec());
    loop {
        let keys = core.engine.keys_after(after.as_deref(), 1024);
        let Some(last) = keys.last().cloned() else {
            return absent;
        };
        for key in keys {
            if end.is_some_and(|end| key.as_slice() > end) {
                return absent;
            }
            if held.contains(key.as_slice())
                || !placement.ring.owns(core.id, &key)
                || !placement.ring.owns(peer, &key)
            {
                continue;
            }
            if let Some((version, false)) = core.engine.held_version(&key)
                && version < tombstone
            {
                absent.push(Absent { key, held: version });
            }
        }
        after = Some(last);
    }
}

/// Writes the tombstones [`Inference::deletes`] decided under map `epoch`,
/// unless the map changed since (the catch-up then starts again): the
/// check holds until they are appended, like a repair's.
pub async fn apply_inferred(
    core: &Arc<NodeCore>,
    epoch: u64,
    deleted: Vec<Record>,
) -> Result<usize, Status> {
    if deleted.is_empty() {
        return Ok(0);
    }
    core.write(move |core| {
        let _placement = core.replication.hold_placement();
        if core
            .replication
            .placement()
            .is_none_or(|p| p.epoch != epoch)
        {
            return Err(Status::aborted(
                "the cluster map changed during a full catch-up",
            ));
        }
        apply_now(core, deleted)
    })
    .await
}

/// What this node holds of `keys`, for a peer's `Versions` call. A node
/// still catching up may hold a value whose delete it has not pulled yet:
/// it does not vouch for live values until it is ready (what it lacks, or
/// holds deleted, still counts).
pub fn held_versions(core: &NodeCore, keys: &[Bytes]) -> Vec<HeldVersion> {
    let ready = core.replication.is_ready();
    keys.iter()
        .map(|key| {
            if core.replication.check_replica(key).is_err() {
                return HeldVersion::default();
            }
            match core.engine.held_version(key) {
                Some((_, false)) if !ready => HeldVersion::default(),
                Some((version, deleted)) => HeldVersion {
                    known: true,
                    version: Some(to_proto(version)),
                    deleted,
                },
                None => HeldVersion {
                    known: true,
                    ..HeldVersion::default()
                },
            }
        })
        .collect()
}

/// Asks the other replicas about the keys a full catch-up from one peer
/// found absent, and keeps one connection per replica across pages.
#[derive(Debug)]
pub struct Inference {
    me: u32,
    links: PeerLinks,
    clients: HashMap<u32, (String, ReplicationClient<PeerChannel>)>,
}

impl Inference {
    /// For node `me`, connecting through `links`.
    pub fn new(me: u32, links: PeerLinks) -> Inference {
        Inference {
            me,
            links,
            clients: HashMap::new(),
        }
    }

    /// The tombstones to write for `candidates`, found absent from `peer`'s
    /// snapshot under `placement`, whose retention cutoff is `cutoff_ms`.
    ///
    /// Fails (ABORTED) when the node's map changes meanwhile: the replicas
    /// answer only under the epoch they are asked with, and the catch-up
    /// starts again under the new map.
    pub async fn deletes(
        &mut self,
        replication: &Replication,
        placement: &Placement,
        peer: u32,
        mut candidates: Vec<Absent>,
        cutoff_ms: u64,
    ) -> Result<Vec<Record>, Status> {
        let tombstone = inferred_tombstone(cutoff_ms);
        let mut deleted = Vec::new();
        let mut pause = FIRST_PAUSE;
        for round in 1..=MAX_ROUNDS {
            if replication
                .placement()
                .is_none_or(|now| now.epoch != placement.epoch)
            {
                return Err(Status::aborted(
                    "the cluster map changed during a full catch-up",
                ));
            }
            let answers = self.ask(placement, peer, &candidates).await;
            let mut undecided = Vec::new();
            let mut may_answer = false;
            for (candidate, answers) in candidates.into_iter().zip(answers) {
                let replicas = placement.ring.preference_list(&candidate.key).len();
                let silent = answers.contains(&Answer::Silent);
                match decide(replicas, answers) {
                    Decision::Deleted => deleted.push(Record {
                        seq: 0,
                        key: candidate.key,
                        value: None,
                        version: tombstone,
                        expires_at: None,
                    }),
                    Decision::Held => {}
                    Decision::Undecided => {
                        may_answer |= silent;
                        undecided.push(candidate);
                    }
                }
            }
            candidates = undecided;
            if candidates.is_empty() {
                return Ok(deleted);
            }
            // Replicas marked down answer nothing under this map.
            if !may_answer {
                break;
            }
            if round < MAX_ROUNDS {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
        tracing::warn!(
            peer,
            keys = candidates.len(),
            "full catch-up: too few replicas answered to tell deleted keys from undelivered ones; keeping them"
        );
        counter!("caskade_node_replication_deletes_undecided_total", "node" => self.me.to_string())
            .increment(candidates.len() as u64);
        Ok(deleted)
    }

    /// Each other replica's answer for each candidate, in order: one
    /// `Versions` call per replica and batch, all replicas at once.
    async fn ask(
        &mut self,
        placement: &Placement,
        peer: u32,
        candidates: &[Absent],
    ) -> Vec<Vec<Answer>> {
        // Replica → indexes of the candidates it replicates.
        let mut asked: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (index, candidate) in candidates.iter().enumerate() {
            for replica in placement.ring.preference_list(&candidate.key) {
                if replica != self.me && replica != peer {
                    asked.entry(replica).or_default().push(index);
                }
            }
        }
        let mut calls = Vec::new();
        for (&replica, indexes) in &asked {
            let down = placement.down.contains(&replica);
            let client = (!down).then(|| self.client(placement, replica)).flatten();
            let epoch = placement.epoch;
            let me = self.me;
            calls.push(async move {
                let Some(mut client) = client else {
                    let none = if down { Answer::Down } else { Answer::Silent };
                    return vec![none; indexes.len()];
                };
                let mut answers = Vec::with_capacity(indexes.len());
                for batch in indexes.chunks(MAX_KEYS) {
                    let request = VersionsRequest {
                        node_id: me,
                        epoch,
                        keys: batch
                            .iter()
                            .map(|&i| Bytes::copy_from_slice(&candidates[i].key))
                            .collect(),
                    };
                    let held =
                        match tokio::time::timeout(ASK_TIMEOUT, client.versions(request)).await {
                            Ok(Ok(response)) => response.into_inner().held,
                            _ => Vec::new(),
                        };
                    if held.len() != batch.len() {
                        // Silent (or a malformed answer): so is the rest.
                        answers.resize(indexes.len(), Answer::Silent);
                        return answers;
                    }
                    answers.extend(
                        batch
                            .iter()
                            .zip(&held)
                            .map(|(&i, held)| answer(held, candidates[i].held)),
                    );
                }
                answers
            });
        }
        let replies = futures_util::future::join_all(calls).await;
        let mut answers = vec![Vec::new(); candidates.len()];
        for (indexes, replies) in asked.values().zip(replies) {
            for (&index, reply) in indexes.iter().zip(replies) {
                answers[index].push(reply);
            }
        }
        answers
    }

    /// A client for `replica`, reconnecting if its address changed.
    fn client(
        &mut self,
        placement: &Placement,
        replica: u32,
    ) -> Option<ReplicationClient<PeerChannel>> {
        let addr = placement.addrs.get(&replica)?;
        if let Some((known, client)) = self.clients.get(&replica)
            && known == addr
        {
            return Some(client.clone());
        }
        match channel(addr, &self.links) {
            Ok(channel) => {
                let client = ReplicationClient::new(channel);
                self.clients.insert(replica, (addr.clone(), client.clone()));
                Some(client)
            }
            Err(e) => {
                tracing::warn!(replica, addr, error = %e, "bad replica address; it counts as silent");
                None
            }
        }
    }
}

/// A replica's [`HeldVersion`] of a key this node holds at `held`.
fn answer(reply: &HeldVersion, held: Version) -> Answer {
    if !reply.known {
        return Answer::Silent;
    }
    match reply.version {
        Some(v) if !reply.deleted && Version::new(v.hlc, v.origin) >= held => Answer::Holds,
        _ => Answer::Lacks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Answer::{Holds, Lacks, Silent};

    #[test]
    fn a_peer_alone_decides_only_with_two_replicas() {
        assert_eq!(decide(2, []), Decision::Deleted);
        assert_eq!(decide(3, []), Decision::Undecided);
        assert_eq!(decide(3, [Silent]), Decision::Undecided);
        assert_eq!(decide(3, [Lacks]), Decision::Deleted);
    }

    #[test]
    fn half_the_replicas_rounded_up_must_lack_the_key() {
        // RF 5: this node, the peer, and three others; ⌈5/2⌉ = 3 lacking.
        assert_eq!(decide(5, [Lacks, Silent, Silent]), Decision::Undecided);
        assert_eq!(decide(5, [Lacks, Lacks, Silent]), Decision::Deleted);
        assert_eq!(decide(4, [Lacks, Silent]), Decision::Deleted);
        assert_eq!(decide(4, [Silent, Silent]), Decision::Undecided);
    }

    #[test]
    fn one_live_copy_at_least_as_new_keeps_the_key() {
        assert_eq!(decide(3, [Holds]), Decision::Held);
        assert_eq!(decide(5, [Lacks, Lacks, Holds]), Decision::Held);
    }

    #[test]
    fn a_tombstone_or_an_older_value_lacks_the_version_held_here() {
        let held = Version::new(1000, 1);
        let reply = |hlc, deleted| HeldVersion {
            known: true,
            version: Some(caskade_proto::Version { hlc, origin: 1 }),
            deleted,
        };
        assert_eq!(answer(&reply(1000, false), held), Holds);
        assert_eq!(answer(&reply(2000, false), held), Holds);
        assert_eq!(answer(&reply(999, false), held), Lacks);
        assert_eq!(answer(&reply(2000, true), held), Lacks);
        assert_eq!(
            answer(
                &HeldVersion {
                    known: true,
                    ..Default::default()
                },
                held
            ),
            Lacks
        );
        assert_eq!(answer(&HeldVersion::default(), held), Silent);
    }
}
