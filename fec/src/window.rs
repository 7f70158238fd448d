//! The decoder's bounded store of recent data packets: a ring of
//! `window_seqs` slots indexed by `seq % window_seqs`.

/// One ring slot; it holds `seq` only while `present` and `seq` match.
#[derive(Debug, Default)]
struct Slot {
    seq: u64,
    present: bool,
    data: Vec<u8>,
}

/// Why a seq was not admitted to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    TooOld,
    FarFuture,
}

/// Holds packets with seqs in `[low, high]`, `high - low < window_seqs`,
/// where `high` is the highest seq seen so far. Memory: `window_seqs`
/// slots of at most `MAX_PACKET_BYTES` each; slot buffers are reused.
#[derive(Debug)]
pub(crate) struct Window {
    slots: Vec<Slot>,
    high: Option<u64>,
    max_advance_seqs: u64,
}

impl Window {
    pub(crate) fn new(window_seqs: u64, max_advance_seqs: u64) -> Self {
        debug_assert!(window_seqs > 0);
        Window { slots: (0..window_seqs).map(|_| Slot::default()).collect(), high: None, max_advance_seqs }
    }

    fn len_seqs(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The lowest seq still inside the window (0 before anything arrived).
    pub(crate) fn low(&self) -> u64 {
        match self.high {
            Some(h) => h.saturating_add(1).saturating_sub(self.len_seqs()),
            None => 0,
        }
    }

    /// The highest seq seen, if any.
    pub(crate) fn high(&self) -> Option<u64> {
        self.high
    }

    /// Checks that `first..=last` may enter the window and moves `high` up
    /// to `last`. Nothing changes on rejection.
    pub(crate) fn admit(&mut self, first: u64, last: u64) -> Result<(), Reject> {
        debug_assert!(first <= last);
        if let Some(h) = self.high {
            if last > h && last - h > self.max_advance_seqs {
                return Err(Reject::FarFuture);
            }
        }
        let new_high = self.high.map_or(last, |h| h.max(last));
        let new_low = new_high.saturating_add(1).saturating_sub(self.len_seqs());
        if first < new_low {
            return Err(Reject::TooOld);
        }
        self.high = Some(new_high);
        Ok(())
    }

    fn slot_index(&self, seq: u64) -> usize {
        // The modulus is the slot count, so the result indexes `slots`.
        (seq % self.len_seqs()) as usize
    }

    /// The packet with this seq, if it is in the window.
    pub(crate) fn get(&self, seq: u64) -> Option<&[u8]> {
        let high = self.high?;
        if seq < self.low() || seq > high {
            return None;
        }
        let slot = &self.slots[self.slot_index(seq)];
        (slot.present && slot.seq == seq).then_some(slot.data.as_slice())
    }

    /// Stores a packet whose seq was admitted; overwrites whatever older
    /// seq shared the slot (it has left the window).
    pub(crate) fn insert(&mut self, seq: u64, payload: &[u8]) {
        debug_assert!(self.high.is_some_and(|h| seq <= h && seq >= self.low()));
        let index = self.slot_index(seq);
        let slot = &mut self.slots[index];
        slot.seq = seq;
        slot.present = true;
        slot.data.clear();
        slot.data.extend_from_slice(payload);
    }
}
