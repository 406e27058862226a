//! Unmasking client payloads in place (RFC 6455 §5.3), with SIMD chosen at run time.
//!
//! Every byte a client sends in a frame payload is XORed with a 4-byte key. The hot path
//! unmasks in place, in the receive buffer, as the bytes arrive: a payload can be split over
//! several reads, so every function takes the position within the key at which the slice
//! starts (`offset`, `0..=3`, taken modulo 4) and the caller keeps `offset + len` for the next
//! piece.
//!
//! Why hand-written: the `u32`-at-a-time loop most crates use is auto-vectorised only to the
//! baseline target (SSE2 on x86_64). Dispatching to AVX2 or AVX-512 at run time moves
//! 32 or 64 bytes per instruction; `benches/unmask.rs` measures the gain against
//! `fastwebsockets::unmask` in the same run.
//!
//! This is the only module of `proto` that may use `unsafe` (for `std::arch`); the scalar
//! path is what Miri runs, and the `no-simd` feature forces it everywhere.

/// Rotates `mask` so that index 0 of the result is the key byte for position `offset`.
#[inline]
fn rotate(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let o = (offset & 3) as u32;
    u32::from_le_bytes(mask).rotate_right(8 * o).to_le_bytes()
}

/// Scalar reference: byte-wise, then 8 bytes at a time. Correct on every target.
pub fn unmask_scalar(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let m = rotate(mask, offset);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key phase is unchanged.
    for (b, k) in chunks.into_remainder().iter_mut().zip(m.iter().cycle()) {
        *b ^= k;
    }
}

/// The implementation [`unmask`] dispatches to; exposed for benches and differential tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// Portable 8-bytes-at-a-time loop.
    Scalar,
    /// 16 bytes per step (x86_64 baseline).
    Sse2,
    /// 32 bytes per step.
    Avx2,
    /// 64 bytes per step (needs AVX-512F).
    Avx512,
}

impl Impl {
    /// Every implementation this CPU can run, slowest first.
    pub fn available() -> Vec<Impl> {
        #[cfg_attr(
            any(not(target_arch = "x86_64"), miri, feature = "no-simd"),
            allow(unused_mut)
        )]
        let mut v = vec![Impl::Scalar];
        #[cfg(all(target_arch = "x86_64", not(miri), not(feature = "no-simd")))]
        {
            v.push(Impl::Sse2);
            if std::is_x86_feature_detected!("avx2") {
                v.push(Impl::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
            {
                v.push(Impl::Avx512);
            }
        }
        v
    }

    /// The fastest implementation available (detected once, then cached).
    pub fn best() -> Impl {
        use std::sync::OnceLock;
        static BEST: OnceLock<Impl> = OnceLock::new();
        *BEST.get_or_init(|| *Impl::available().last().unwrap_or(&Impl::Scalar))
    }

    /// Unmasks with this implementation. An implementation the CPU lacks falls back to
    /// scalar, so this is always safe to call.
    pub fn apply(self, buf: &mut [u8], mask: [u8; 4], offset: usize) {
        // Below one vector, the setup costs more than it saves.
        if buf.len() < 16 {
            return unmask_scalar(buf, mask, offset);
        }
        #[cfg(all(target_arch = "x86_64", not(miri), not(feature = "no-simd")))]
        {
            let m = rotate(mask, offset);
            match self {
                Impl::Scalar => {}
                // SAFETY: SSE2 is part of the x86_64 baseline.
                Impl::Sse2 => return unsafe { x86::sse2(buf, m) },
                Impl::Avx2 if std::is_x86_feature_detected!("avx2") => {
                    // SAFETY: the CPU supports AVX2 (checked on this line).
                    return unsafe { x86::avx2(buf, m) };
                }
                Impl::Avx512
                    if std::is_x86_feature_detected!("avx512f")
                        && std::is_x86_feature_detected!("avx512bw") =>
                {
                    // SAFETY: the CPU supports AVX-512F and AVX-512BW (checked just above).
                    return unsafe { x86::avx512(buf, m) };
                }
                _ => {}
            }
        }
        unmask_scalar(buf, mask, offset)
    }
}

/// Below this many bytes the inlined 8-bytes-at-a-time loop beats any dispatch.
const SIMD_THRESHOLD: usize = 64;

/// Unmasks `buf` in place with `mask`, the first byte of `buf` being at position `offset`
/// (mod 4) of the payload. Uses the fastest implementation this CPU has.
#[inline]
pub fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    if buf.len() < SIMD_THRESHOLD {
        return unmask_scalar(buf, mask, offset);
    }
    Impl::best().apply(buf, mask, offset)
}

#[cfg(all(target_arch = "x86_64", not(miri), not(feature = "no-simd")))]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    /// XORs the tail (shorter than one vector) 8 bytes at a time; `done` is a multiple of
    /// 4, so the key phase at the tail is `m[0]`.
    #[inline(always)]
    fn tail(buf: &mut [u8], done: usize, m: [u8; 4]) {
        if let Some(rest) = buf.get_mut(done..) {
            super::unmask_scalar(rest, m, 0);
        }
    }

    /// # Safety
    /// The CPU must support SSE2 (always true on x86_64).
    #[target_feature(enable = "sse2")]
    pub unsafe fn sse2(buf: &mut [u8], m: [u8; 4]) {
        let key = _mm_set1_epi32(i32::from_ne_bytes(m));
        let n = buf.len() / 16 * 16;
        let p = buf.as_mut_ptr();
        let mut i = 0;
        while i < n {
            // SAFETY: i + 16 <= n <= buf.len(); unaligned loads/stores are allowed.
            unsafe {
                let v = _mm_loadu_si128(p.add(i).cast());
                _mm_storeu_si128(p.add(i).cast(), _mm_xor_si128(v, key));
            }
            i += 16;
        }
        tail(buf, n, m);
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2(buf: &mut [u8], m: [u8; 4]) {
        let key = _mm256_set1_epi32(i32::from_ne_bytes(m));
        let n = buf.len() / 32 * 32;
        let p = buf.as_mut_ptr();
        let mut i = 0;
        // Two vectors per step keep both load ports busy.
        while i + 64 <= n {
            // SAFETY: i + 64 <= n <= buf.len(); unaligned loads/stores are allowed.
            unsafe {
                let a = _mm256_loadu_si256(p.add(i).cast());
                let b = _mm256_loadu_si256(p.add(i + 32).cast());
                _mm256_storeu_si256(p.add(i).cast(), _mm256_xor_si256(a, key));
                _mm256_storeu_si256(p.add(i + 32).cast(), _mm256_xor_si256(b, key));
            }
            i += 64;
        }
        if i < n {
            // SAFETY: i + 32 == n <= buf.len().
            unsafe {
                let a = _mm256_loadu_si256(p.add(i).cast());
                _mm256_storeu_si256(p.add(i).cast(), _mm256_xor_si256(a, key));
            }
        }
        // SAFETY: SSE2 is implied by AVX2; it handles the last 16..31 bytes.
        unsafe { sse2(buf.get_mut(n..).unwrap_or_default(), m) };
    }

    /// # Safety
    /// The CPU must support AVX-512F and AVX-512BW (the byte-masked tail).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn avx512(buf: &mut [u8], m: [u8; 4]) {
        let key = _mm512_set1_epi32(i32::from_ne_bytes(m));
        let n = buf.len() / 64 * 64;
        let p = buf.as_mut_ptr();
        let mut i = 0;
        while i < n {
            // SAFETY: i + 64 <= n <= buf.len(); unaligned loads/stores are allowed.
            unsafe {
                let a = _mm512_loadu_si512(p.add(i).cast());
                _mm512_storeu_si512(p.add(i).cast(), _mm512_xor_si512(a, key));
            }
            i += 64;
        }
        let rest = buf.len() - n;
        if rest > 0 {
            // A masked load/store finishes the tail without a byte loop.
            let k: __mmask64 = if rest == 64 { !0 } else { (1u64 << rest) - 1 };
            // SAFETY: the mask k enables only the `rest` bytes in bounds; masked-off
            // lanes are neither read nor written (no fault on them).
            unsafe {
                let a = _mm512_maskz_loadu_epi8(k, p.add(n).cast());
                _mm512_mask_storeu_epi8(p.add(n).cast(), k, _mm512_xor_si512(a, key));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(i + offset) & 3];
        }
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn every_impl_equals_reference_for_every_length_and_offset() {
        let mask = [0x12, 0x34, 0xAB, 0xCD];
        let data = pattern(4096 + 64, 1);
        for imp in Impl::available() {
            for len in 0..4096usize {
                for offset in 0..4 {
                    // Vary alignment too: start at len % 61 within the buffer.
                    let start = len % 61;
                    let mut ours = data[start..start + len].to_vec();
                    let mut want = ours.clone();
                    imp.apply(&mut ours, mask, offset);
                    reference(&mut want, mask, offset);
                    assert_eq!(ours, want, "{imp:?} len {len} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn random_large_buffers_and_split_points_agree() {
        for seed in 0..20u64 {
            let len = 4096 + (seed as usize * 7919) % 300_000;
            let data = pattern(len, seed);
            let mask = (seed as u32).wrapping_mul(2_654_435_761).to_le_bytes();
            let mut want = data.clone();
            reference(&mut want, mask, 0);
            for imp in Impl::available() {
                // Unmask in pieces, as a payload that arrives over several reads.
                let mut ours = data.clone();
                let cut1 = (seed as usize * 31) % len;
                let cut2 = cut1 + (len - cut1) / 3;
                imp.apply(&mut ours[..cut1], mask, 0);
                imp.apply(&mut ours[cut1..cut2], mask, cut1);
                imp.apply(&mut ours[cut2..], mask, cut2);
                assert_eq!(ours, want, "{imp:?} seed {seed}");
            }
        }
    }

    #[test]
    fn unmasking_twice_restores_the_input() {
        let data = pattern(1000, 9);
        let mut buf = data.clone();
        unmask(&mut buf, [1, 2, 3, 4], 3);
        assert_ne!(buf, data);
        unmask(&mut buf, [1, 2, 3, 4], 3);
        assert_eq!(buf, data);
    }
}
