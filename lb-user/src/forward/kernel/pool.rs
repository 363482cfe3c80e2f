//! Buffers for a kernel flow's held bytes (the copying in [`super::direction`]), lent by a
//! pool per session thread, so that the holds of a thread reuse the same memory.
//!
//! A hold copies a few hundred KB to a few MB. A fresh buffer for each cost more than the
//! copy itself: the allocator maps new pages for a buffer that large, and the kernel zeroes
//! each page as it is first touched (half of lb's CPU, in `clear_page_erms`, with four readers
//! paced at 10 MB/s). A pooled buffer keeps its pages and its initialised length.
use std::cell::RefCell;

/// Buffers a thread keeps between holds (more holds at once allocate their own): at most
/// 16 MiB per session thread, kept for the thread's life.
const KEPT: usize = 4;
/// The largest buffer kept: a larger one (an overcommitted socket's bytes, up to
/// `max_in_flight`) goes back to the allocator.
const MAX_KEPT_LEN: usize = 4 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer taken from the thread's pool when first used, and given back when dropped.
#[derive(Default)]
pub(super) struct Buffer(Vec<u8>);

impl Buffer {
    /// The buffer, at least `len` bytes long (bytes past the old length are zeroed).
    pub(super) fn at_least(&mut self, len: usize) -> &mut Vec<u8> {
        if self.0.capacity() == 0 {
            self.0 = POOL
                .try_with(|p| p.borrow_mut().pop())
                .ok()
                .flatten()
                .unwrap_or_default();
        }
        if self.0.len() < len {
            self.0.resize(len, 0);
        }
        &mut self.0
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() == 0 || buf.capacity() > MAX_KEPT_LEN {
            return;
        }
        // (During the thread's exit the pool may be gone: the buffer is simply freed.)
        let _ = POOL.try_with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < KEPT {
                pool.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_lent_again_with_its_length_and_the_pool_is_bounded() {
        let mut a = Buffer::default();
        a.at_least(1000)[999] = 7;
        let ptr = a.as_slice().as_ptr();
        drop(a);
        let mut b = Buffer::default();
        let v = b.at_least(10);
        assert_eq!((v.as_ptr(), v.len(), v[999]), (ptr, 1000, 7));
        drop(b);

        let mut held: Vec<Buffer> = (0..KEPT + 3).map(|_| Buffer::default()).collect();
        for b in &mut held {
            b.at_least(64);
        }
        drop(held);
        assert_eq!(POOL.with(|p| p.borrow().len()), KEPT);

        let mut big = Buffer::default();
        big.at_least(MAX_KEPT_LEN + 1);
        let before = POOL.with(|p| p.borrow().len());
        drop(big);
        assert_eq!(
            POOL.with(|p| p.borrow().len()),
            before,
            "a buffer past the bound is freed"
        );
    }
}
