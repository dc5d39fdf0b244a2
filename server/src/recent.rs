//! A bounded map that keeps what was used recently: the caches and rate-limit buckets that
//! strangers can make the server create (one per client id, one per address) must not grow
//! without end.

use std::collections::HashMap;
use std::hash::Hash;

/// At most `cap` entries, in two generations: lookups promote to the young one, and when the
/// young one holds `cap / 2` entries the old one is dropped and the young one becomes old.
/// So an entry used within the last `cap / 2` insertions is always kept, every operation is
/// O(1) amortised, and no ordering list has to be maintained (a cheap approximation of LRU).
pub struct Recent<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    half: usize,
}

impl<K: Hash + Eq, V> Recent<K, V> {
    /// A map of at most `cap` entries (at least 2).
    pub fn new(cap: usize) -> Self {
        Recent {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (cap / 2).max(1),
        }
    }

    /// The entry of `key`, promoted to the young generation, if it is still kept.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V>
    where
        K: Clone,
    {
        if !self.young.contains_key(key) {
            let value = self.old.remove(key)?;
            self.insert(key.clone(), value);
        }
        self.young.get_mut(key)
    }

    /// Inserts or replaces `key`'s entry.
    pub fn insert(&mut self, key: K, value: V) {
        if self.young.len() >= self.half && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }

    /// How many entries are kept now.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_bounded_and_keeps_what_is_used() {
        let mut map = Recent::new(100);
        map.insert(0u32, 0u32);
        for i in 1..10_000 {
            map.insert(i, i);
            // Touching 0 keeps it however many others come and go.
            assert_eq!(map.get_mut(&0).copied(), Some(0));
            assert!(map.len() <= 100);
        }
        assert!(map.get_mut(&1).is_none(), "an unused old entry is gone");
        assert_eq!(map.get_mut(&9_999).copied(), Some(9_999));
    }
}
