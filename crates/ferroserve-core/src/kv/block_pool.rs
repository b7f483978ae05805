//! Reference counts of KV blocks and the list of free ones.
//!
//! A block is in use while its count is above zero (one per sequence holding it; sequences
//! sharing a cached prefix share its blocks). Free blocks wait in one list, in the order
//! they should be reused: blocks holding nothing anyone could look up first, then blocks
//! still registered in the prefix cache, least recently freed first (LRU eviction). Every
//! operation is O(1): the list is doubly linked through two arrays indexed by block id, so
//! reviving a free cached block takes it out of the middle without a search.

/// "No block" in the links.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub(crate) struct BlockPool {
    refcounts: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    free: usize,
}

impl BlockPool {
    /// `num_blocks` free blocks, handed out in id order.
    pub(crate) fn new(num_blocks: usize) -> Self {
        assert!(num_blocks < NIL as usize, "{num_blocks} blocks do not fit u32 ids");
        let n = num_blocks as u32;
        BlockPool {
            refcounts: vec![0; num_blocks],
            prev: (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect(),
            next: (0..n).map(|i| if i + 1 == n { NIL } else { i + 1 }).collect(),
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            free: num_blocks,
        }
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.refcounts.len()
    }

    pub(crate) fn num_free(&self) -> usize {
        self.free
    }

    pub(crate) fn refcount(&self, block: u32) -> u32 {
        self.refcounts[block as usize]
    }

    /// The next free block to reuse, without taking it.
    pub(crate) fn peek_free(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    /// Takes a free block (the head of the list) with a count of one.
    pub(crate) fn take(&mut self) -> Option<u32> {
        let block = self.peek_free()?;
        self.unlink(block);
        self.refcounts[block as usize] = 1;
        Some(block)
    }

    /// One more holder of `block`. A free block is taken out of the free list (a cache hit
    /// reviving it).
    pub(crate) fn retain(&mut self, block: u32) {
        let count = &mut self.refcounts[block as usize];
        if *count == 0 {
            self.unlink(block);
            self.refcounts[block as usize] = 1;
        } else {
            *count = count.checked_add(1).expect("block refcount overflow");
        }
    }

    /// One holder fewer. At zero the block becomes free: reused first when `keep` is false,
    /// last (after every other free block) when true. Returns whether it became free.
    pub(crate) fn release(&mut self, block: u32, keep: bool) -> bool {
        let count = &mut self.refcounts[block as usize];
        assert!(*count > 0, "KV block {block} released more often than it was allocated or retained");
        *count -= 1;
        if *count > 0 {
            return false;
        }
        if keep {
            self.push_back(block);
        } else {
            self.push_front(block);
        }
        true
    }

    fn unlink(&mut self, block: u32) {
        let (p, n) = (self.prev[block as usize], self.next[block as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[block as usize] = NIL;
        self.next[block as usize] = NIL;
        self.free -= 1;
    }

    fn push_front(&mut self, block: u32) {
        self.prev[block as usize] = NIL;
        self.next[block as usize] = self.head;
        if self.head == NIL {
            self.tail = block;
        } else {
            self.prev[self.head as usize] = block;
        }
        self.head = block;
        self.free += 1;
    }

    fn push_back(&mut self, block: u32) {
        self.next[block as usize] = NIL;
        self.prev[block as usize] = self.tail;
        if self.tail == NIL {
            self.head = block;
        } else {
            self.next[self.tail as usize] = block;
        }
        self.tail = block;
        self.free += 1;
    }

    /// The free list from head to tail (tests).
    #[cfg(test)]
    pub(crate) fn free_order(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let mut b = self.head;
        while b != NIL {
            out.push(b);
            b = self.next[b as usize];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_retain_release() {
        let mut pool = BlockPool::new(4);
        assert_eq!(pool.free_order(), [0, 1, 2, 3]);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_eq!((a, b, pool.num_free()), (0, 1, 2));
        pool.retain(a);
        assert!(!pool.release(a, false));
        assert!(pool.release(a, true)); // kept: goes to the back
        assert!(pool.release(b, false)); // not kept: reused first
        assert_eq!(pool.free_order(), [1, 2, 3, 0]);
        // Reviving a free block from the middle of the list.
        pool.retain(3);
        assert_eq!((pool.free_order(), pool.refcount(3)), (vec![1, 2, 0], 1));
        assert_eq!([pool.take(), pool.take(), pool.take(), pool.take()], [Some(1), Some(2), Some(0), None]);
        assert_eq!(pool.num_free(), 0);
        for blk in 0..4 {
            pool.release(blk, false);
        }
        assert_eq!(pool.num_free(), 4);
        assert_eq!(pool.free_order().len(), 4);
    }

    #[test]
    #[should_panic(expected = "released more often")]
    fn double_release_panics() {
        let mut pool = BlockPool::new(2);
        let a = pool.take().unwrap();
        pool.release(a, false);
        pool.release(a, false);
    }

    #[test]
    fn empty_pool() {
        let mut pool = BlockPool::new(0);
        assert_eq!((pool.take(), pool.num_free()), (None, 0));
    }
}
