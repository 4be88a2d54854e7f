//! Sets of slots.

use serde::{Deserialize, Serialize};

use super::SLOTS;

/// A set of slots, as a bitmap (512 bytes for 4096 slots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSet {
    words: Vec<u64>,
}

impl Default for SlotSet {
    fn default() -> Self {
        Self::new()
    }
}

impl SlotSet {
    pub fn new() -> Self {
        Self {
            words: vec![0; (SLOTS / 64) as usize],
        }
    }

    pub fn insert(&mut self, slot: u32) {
        if let Some(w) = self.words.get_mut((slot / 64) as usize) {
            *w |= 1 << (slot % 64);
        }
    }

    pub fn contains(&self, slot: u32) -> bool {
        self.words
            .get((slot / 64) as usize)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Slots in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..SLOTS).filter(|&s| self.contains(s))
    }

    /// The first slot of the set at or after `from`.
    pub fn next_from(&self, from: u32) -> Option<u32> {
        (from..SLOTS).find(|&s| self.contains(s))
    }

    pub fn union(&mut self, other: &SlotSet) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }

    pub fn intersect(&mut self, other: &SlotSet) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= o;
        }
    }
}

impl FromIterator<u32> for SlotSet {
    fn from_iter<T: IntoIterator<Item = u32>>(iter: T) -> Self {
        let mut set = SlotSet::new();
        for s in iter {
            set.insert(s);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_set_behaves_as_a_set_of_slots() {
        let mut a: SlotSet = [0, 63, 64, SLOTS - 1].into_iter().collect();
        a.insert(SLOTS); // out of range: ignored
        assert_eq!(a.len(), 4);
        assert!(a.contains(63) && a.contains(64) && !a.contains(1) && !a.contains(SLOTS));
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 63, 64, SLOTS - 1]);
        assert_eq!(a.next_from(1), Some(63));
        assert_eq!(a.next_from(SLOTS), None);
        let b: SlotSet = [64, 65].into_iter().collect();
        let mut u = a.clone();
        u.union(&b);
        assert_eq!(u.len(), 5);
        let mut i = a.clone();
        i.intersect(&b);
        assert_eq!(i.iter().collect::<Vec<_>>(), vec![64]);
        assert!(SlotSet::new().is_empty() && !i.is_empty());
    }
}
