//! The replica links of a running volume: a table that only grows.
//!
//! `replica add` appends a link while I/O runs; `replica remove` marks one
//! removed and leaves it in place, so a link's index (its bit in read
//! masks, its slot in `Core::links`) never changes while the HE runs. The
//! table holds at most [`MAX_REPLICAS`] links over the HE's lifetime; a
//! restart compacts it. Readers take no lock: a slot is filled before the
//! length that makes it visible.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::link::Link;
use super::MAX_REPLICAS;

/// Append-only table of links.
pub(crate) struct LinkTable {
    slots: Box<[OnceLock<Arc<Link>>]>,
    len: AtomicUsize,
}

impl LinkTable {
    /// A table holding `links`.
    pub fn new(links: Vec<Arc<Link>>) -> LinkTable {
        assert!(links.len() <= MAX_REPLICAS, "at most {MAX_REPLICAS} replicas");
        let t = LinkTable { slots: (0..MAX_REPLICAS).map(|_| OnceLock::new()).collect(), len: AtomicUsize::new(0) };
        for l in links {
            t.push(l).expect("checked above");
        }
        t
    }

    /// Appends a link; returns its index, or `None` when the table is full.
    /// Callers hold the engine lock, so indices match `Core::links`.
    pub fn push(&self, link: Arc<Link>) -> Option<usize> {
        let i = self.len.load(Ordering::Acquire);
        debug_assert_eq!(link.idx, i, "a link's index is its slot");
        self.slots.get(i)?.set(link).ok().expect("slot past the length is empty");
        self.len.store(i + 1, Ordering::Release);
        Some(i)
    }

    /// Links in the table.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Every link, in index order.
    pub fn iter(&self) -> Iter<'_> {
        self.slots[..self.len()].iter().map(filled)
    }
}

impl std::ops::Index<usize> for LinkTable {
    type Output = Arc<Link>;
    fn index(&self, i: usize) -> &Arc<Link> {
        self.slots[i].get().expect("link index within the table")
    }
}

/// Iterator over a [`LinkTable`] (no allocation: it runs per write).
pub(crate) type Iter<'a> =
    std::iter::Map<std::slice::Iter<'a, OnceLock<Arc<Link>>>, fn(&OnceLock<Arc<Link>>) -> &Arc<Link>>;

fn filled(s: &OnceLock<Arc<Link>>) -> &Arc<Link> {
    s.get().expect("slots below the length are filled")
}

impl<'a> IntoIterator for &'a LinkTable {
    type Item = &'a Arc<Link>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}
