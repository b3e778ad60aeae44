//! A slab of values named by the [`Ticket`] that travels with each request to a worker and
//! back: the storage of the in-flight table (`inflight.rs`). A slot's generation changes
//! every time it is freed, so a late reply for a request that already timed out (and whose
//! slot was reused) is recognised and dropped.

use worker::Ticket;

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// At most `capacity` values, each named by a ticket.
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
    capacity: usize,
}

impl<T> Slab<T> {
    /// An empty slab that holds at most `capacity` values. Memory grows with use, not with
    /// the capacity, so a large `--max-inflight` costs nothing until requests fill it.
    pub fn new(capacity: usize) -> Slab<T> {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            capacity: capacity.min(u32::MAX as usize),
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when another insert would fail.
    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Stores `value`; when full, gives it back.
    pub fn insert(&mut self, value: T) -> Result<Ticket, T> {
        if self.is_full() {
            return Err(value);
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.value = Some(value);
        self.len += 1;
        Ok(Ticket {
            slot,
            generation: s.generation,
        })
    }

    /// The value `ticket` names, if it is still held.
    pub fn get(&self, ticket: Ticket) -> Option<&T> {
        let s = self.slots.get(ticket.slot as usize)?;
        (s.generation == ticket.generation)
            .then_some(s.value.as_ref())
            .flatten()
    }

    /// Takes the value `ticket` names; `None` for a stale or unknown ticket.
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        let s = self.slots.get_mut(ticket.slot as usize)?;
        if s.generation != ticket.generation {
            return None;
        }
        let value = s.value.take()?;
        s.generation = s.generation.wrapping_add(1);
        self.free.push(ticket.slot);
        self.len -= 1;
        Some(value)
    }

    /// Tickets of everything held (for the drain deadline).
    pub fn tickets(&self) -> Vec<Ticket> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(slot, s)| Ticket {
                slot: slot as u32,
                generation: s.generation,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_and_capacity() {
        let mut slab = Slab::new(2);
        let a = slab.insert("a").expect("room");
        let b = slab.insert("b").expect("room");
        assert!(slab.is_full());
        assert_eq!(slab.insert("c"), Err("c"), "full");
        assert_eq!(slab.get(a), Some(&"a"));
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.len(), 1);
        let c = slab.insert("c").expect("room again");
        assert_eq!(c.slot, a.slot, "the freed slot is reused");
        assert_ne!(c.generation, a.generation);
        let mut held = slab.tickets();
        held.sort_by_key(|t| t.slot);
        assert_eq!(held, [c, b]);
    }

    #[test]
    fn stale_and_unknown_tickets_find_nothing() {
        let mut slab = Slab::new(4);
        let a = slab.insert(1).expect("room");
        assert_eq!(slab.remove(a), Some(1));
        assert_eq!(slab.remove(a), None, "removed twice");
        let b = slab.insert(2).expect("room");
        assert_eq!(b.slot, a.slot);
        // The old ticket names the reused slot's previous generation.
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.get(b), Some(&2));
        let unknown = Ticket {
            slot: 99,
            generation: 0,
        };
        assert_eq!(slab.remove(unknown), None);
    }

    #[test]
    fn generations_wrap_without_confusing_tickets() {
        let mut slab = Slab::new(1);
        slab.insert(0u8).expect("room");
        slab.slots[0].generation = u32::MAX;
        // Re-key the held value at the last generation, then cycle past the wrap.
        slab.slots[0].value = None;
        slab.len = 0;
        slab.free.push(0);
        let last = slab.insert(1).expect("room");
        assert_eq!(last.generation, u32::MAX);
        assert_eq!(slab.remove(last), Some(1));
        let wrapped = slab.insert(2).expect("room");
        assert_eq!(wrapped.generation, 0);
        assert_eq!(slab.remove(last), None, "the pre-wrap ticket is stale");
        assert_eq!(slab.remove(wrapped), Some(2));
    }

    #[test]
    fn a_huge_capacity_allocates_nothing_up_front() {
        let slab: Slab<u64> = Slab::new(usize::MAX);
        assert_eq!(slab.slots.capacity(), 0);
        assert!(!slab.is_full());
    }
}
