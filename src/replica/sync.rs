//! Synchronisation between the replicas of one partition (see the parent module's doc,
//! "Sync" and "Handoffs"): the messages, serving a peer's request from a snapshot (the
//! log pages and the state-transfer pages), applying what a peer sent, and the claims a
//! completed transfer or handoff lets a replica make.

use super::*;

/// Peer `have` asks for what it lacks. Bounds keep every answer small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub partition: PartitionUid,
    pub have: VersionVector,
    pub max_entries: u32,
    pub max_bytes: u32,
}

/// One page of what the asking peer lacks. See the module doc.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    pub log: Vec<LogEntry>,
    pub states: Vec<(u32, String, KeyState)>,
    /// The asker may raise its applied vector to this after applying the page.
    pub covered: VersionVector,
    /// False when a bound cut the page short: ask again.
    pub complete: bool,
    /// The answering replica lacks log entries the asker still needs for at least one
    /// origin (trimmed, or claimed through a snapshot); `covered` leaves those origins
    /// alone. Another peer may have them; otherwise a snapshot is needed.
    pub gap: bool,
    /// The answering replica's `absorbed` vector, for the asker to compare with its own
    /// (informational: nothing here lets the asker claim it).
    pub absorbed: VersionVector,
    /// A quorum write at the answering replica waits for its peers: after applying this
    /// page the asker should report its new `have` at once (with another request)
    /// rather than at its next interval. Set by the node, not by [`Replica::serve_sync`].
    pub ack_wanted: bool,
}

/// Ask for a page of a replica's keys in a set of slots: its whole state (a peer that
/// fell behind the trimmed log, or a member joining the partition), or the slots a view
/// change moves to another partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub partition: PartitionUid,
    /// Serve only if the server's view has this epoch. A handoff reads the old owner in
    /// the old view: an owner that already switched no longer holds the moved slots and
    /// would answer with empty pages.
    pub epoch: Option<u64>,
    /// Only these slots (always intersected with the slots the replica owns); `None`
    /// for all it owns.
    pub slots: Option<SlotSet>,
    /// Resume after this `(slot, key)`; `None` starts the transfer.
    pub after: Option<(u32, String)>,
    pub max_entries: u32,
    pub max_bytes: u32,
}

/// One page of a state transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPage {
    pub states: Vec<(u32, String, KeyState)>,
    /// Where the next page starts; `None` when this was the last page.
    pub next: Option<(u32, String)>,
    /// The serving replica's vectors in the snapshot this page was read from. Those of
    /// the *first* page are what a whole transfer may claim (see
    /// [`Replica::serve_snapshot`]).
    pub applied: VersionVector,
    pub absorbed: VersionVector,
}

/// What a completed state transfer lets the receiver claim.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub applied: VersionVector,
    pub absorbed: VersionVector,
}

impl Replica {
    /// Answers a peer's [`SyncRequest`] from a snapshot in which this replica was
    /// `state`. States of keys outside `owned` (slots handed over to another partition)
    /// are not shipped: the log entry is still covered, the key is no longer ours.
    pub fn serve_sync(
        txn: &dyn ReadTxn,
        state: &Replica,
        owned: &SlotSet,
        req: &SyncRequest,
    ) -> Result<SyncResponse> {
        let applied = &state.applied;
        let max_entries = req.max_entries.max(1) as usize;
        let max_bytes = req.max_bytes as usize;
        let mut resp = SyncResponse {
            covered: req.have.clone(),
            complete: true,
            absorbed: state.absorbed.clone(),
            ..SyncResponse::default()
        };
        let mut sent_keys: BTreeSet<(u32, String)> = BTreeSet::new();
        let mut bytes = 0usize;
        'origins: for (origin, upto) in applied.iter() {
            let mut last = req.have.get(origin);
            while last < upto {
                if resp.log.len() >= max_entries || bytes >= max_bytes {
                    resp.complete = false;
                    return Ok(resp);
                }
                let budget = max_entries - resp.log.len();
                let entries = txn.log_after(origin, last, budget)?;
                for entry in &entries {
                    if entry.dot.counter != last + 1 {
                        // Trimmed here (or a range claimed by a snapshot): this origin
                        // cannot be claimed from us, but the others still can.
                        resp.gap = true;
                        continue 'origins;
                    }
                    if entry.dot.counter > upto {
                        continue 'origins;
                    }
                    if owned.contains(entry.slot)
                        && sent_keys.insert((entry.slot, entry.key.clone()))
                    {
                        if let Some(state) = txn.get(entry.slot, &entry.key)? {
                            bytes += entry.key.len() + state.approx_size();
                            resp.states.push((entry.slot, entry.key.clone(), state));
                        }
                    }
                    resp.covered.raise(origin, entry.dot.counter);
                    resp.log.push(entry.clone());
                    last = entry.dot.counter;
                    if bytes >= max_bytes {
                        break;
                    }
                }
                if entries.is_empty() {
                    resp.gap = true;
                    continue 'origins;
                }
            }
        }
        Ok(resp)
    }

    /// Answers a page of a state transfer of the keys in `slots`, from a snapshot in
    /// which this replica was `state`.
    ///
    /// Why the first page's vectors may be claimed once the last page is merged (for a
    /// transfer of everything the partition owns): a write `w` in those vectors was
    /// reflected in the server's state of `w`'s key when the first page was read; states
    /// only ever grow to cover more (merge keeps a write or its superseder), and keys of
    /// owned slots are never removed; so whichever later snapshot the page holding that
    /// key came from still covered `w`. A slot handed over mid-transfer drops out of
    /// `slots` and out of the claim's meaning alike: its keys are no longer ours.
    pub fn serve_snapshot(
        txn: &dyn ReadTxn,
        state: &Replica,
        slots: &SlotSet,
        req: &SnapshotRequest,
    ) -> Result<SnapshotPage> {
        let max_entries = req.max_entries.max(1) as usize;
        let max_bytes = req.max_bytes as usize;
        let mut page = SnapshotPage {
            applied: state.applied.clone(),
            absorbed: state.absorbed.clone(),
            ..SnapshotPage::default()
        };
        let mut bytes = 0usize;
        let (mut slot, mut after) = match &req.after {
            Some((slot, key)) => (*slot, Some(key.clone())),
            None => (0, None),
        };
        loop {
            if !slots.contains(slot) {
                match slots.next_from(slot) {
                    Some(s) => (slot, after) = (s, None),
                    None => return Ok(page),
                }
            }
            // Read in small chunks so the byte bound is honoured without loading
            // max_entries.
            let chunk = txn.scan_slot(
                slot,
                after.as_deref(),
                64.min(max_entries - page.states.len()),
            )?;
            if chunk.is_empty() {
                match slot.checked_add(1).and_then(|s| slots.next_from(s)) {
                    Some(s) => (slot, after) = (s, None),
                    None => return Ok(page),
                }
                continue;
            }
            for (key, st) in chunk {
                bytes += key.len()
                    + st.versions
                        .iter()
                        .map(|v| v.value.as_ref().map_or(0, Vec::len) + 64)
                        .sum::<usize>();
                after = Some(key.clone());
                page.states.push((slot, key, st));
                if bytes >= max_bytes || page.states.len() >= max_entries {
                    page.next = after.map(|k| (slot, k));
                    return Ok(page);
                }
            }
        }
    }

    /// Applies a page from a peer. Not durable until the caller commits.
    pub fn apply_sync(&mut self, txn: &mut dyn WriteTxn, resp: &SyncResponse) -> Result<()> {
        Self::merge_states(txn, &resp.states)?;
        for entry in &resp.log {
            // Entries we already cover are in our log already (or trimmed from it).
            if !self.applied.contains(entry.dot) {
                txn.log_append(entry)?;
            }
        }
        self.applied.merge(&resp.covered);
        Ok(())
    }

    /// Merges transferred key states into the store, without log entries or claims (a
    /// transfer claims once, at its end). Returns how many keys changed.
    pub fn merge_states(
        txn: &mut dyn WriteTxn,
        states: &[(u32, String, KeyState)],
    ) -> Result<usize> {
        let mut changed = 0;
        for (slot, key, state) in states {
            let mut current = txn.get(*slot, key)?.unwrap_or_default();
            if current.merge(state) {
                txn.put(*slot, key, &current)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Raises the vectors by what a completed transfer lets this replica claim.
    pub fn claim(&mut self, claim: &Claim) {
        self.applied.merge(&claim.applied);
        self.absorbed.merge(&claim.absorbed);
    }

    /// Raises `absorbed` by a handoff's claim (see the module doc).
    pub fn absorb_claim(&mut self, claim: &VersionVector) {
        self.absorbed.merge(claim);
    }

    /// Log entries every replica of the partition has: for each origin, the minimum of
    /// this replica's and every peer's applied counter. Only call with the vectors of
    /// *all* peers, or the log could be trimmed under a peer that still needs it.
    pub fn trim_floor<'a>(
        applied: &VersionVector,
        peers: impl IntoIterator<Item = &'a VersionVector>,
    ) -> VersionVector {
        let mut floor = applied.clone();
        for peer in peers {
            floor = floor.iter().map(|(r, c)| (r, c.min(peer.get(r)))).collect();
        }
        floor
    }
}
