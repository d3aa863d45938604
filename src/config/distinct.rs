//! The distinct values of a list as it is read, for finding the ones given twice at a cost that
//! stays linear in the list.

use std::collections::HashSet;
use std::hash::Hash;

/// From this many distinct values, repeats are found through a set; below it, by a look through
/// them. Most lists of a config hold one to three values, and a set in each was an allocation
/// per list at 200,000 apps; a hostile file can hold millions in one list (an app's Addresses
/// or Hostnames), where a look through each time would be quadratic.
pub(super) const SET_FROM: usize = 16;

/// The distinct values so far, in the order first given.
pub(super) struct Distinct<T> {
    values: Vec<T>,
    set: Option<HashSet<T>>,
}

impl<T: Eq + Hash + Clone> Distinct<T> {
    /// Room for `n` values (a list with no repeat keeps this vector as it is).
    pub(super) fn with_capacity(n: usize) -> Distinct<T> {
        Distinct {
            values: Vec::with_capacity(n),
            set: None,
        }
    }

    /// Add `v` unless it was given before; whether it was new.
    pub(super) fn insert(&mut self, v: T) -> bool {
        let new = match &mut self.set {
            Some(set) => set.insert(v.clone()),
            None => !self.values.contains(&v),
        };
        if new {
            self.values.push(v);
            if self.set.is_none() && self.values.len() >= SET_FROM {
                self.set = Some(self.values.iter().cloned().collect());
            }
        }
        new
    }

    pub(super) fn into_vec(self) -> Vec<T> {
        self.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Repeats are found below, at and past SET_FROM, wherever the first of them is, and the
    /// values come out once each, in the order first given.
    #[test]
    fn repeats_found_on_both_sides_of_the_set() {
        for len in [1, SET_FROM - 1, SET_FROM, SET_FROM + 7] {
            let mut d = Distinct::with_capacity(len);
            for v in 0..len {
                assert!(d.insert(v), "{v} of {len} is new");
            }
            for v in [0, len / 2, len - 1] {
                assert!(!d.insert(v), "{v} of {len} again");
            }
            assert!(d.insert(len), "{len}: a new value after repeats");
            assert_eq!(d.into_vec(), (0..=len).collect::<Vec<_>>());
        }
    }
}
