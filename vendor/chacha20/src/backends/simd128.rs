//! WebAssembly `simd128` backend.
//!
//! Bulk keystream is generated four blocks at a time in the "vertical" layout: each of
//! the 16 `v128` state vectors holds one state word of four consecutive blocks (lane `i`
//! is block `i`), so the rounds need no lane shuffles; the four blocks are transposed
//! back into byte order only once, at the end. A single block (the tail of a message,
//! or the Poly1305 key block of an AEAD) uses the "horizontal" row layout of the SSE2
//! backend instead.
//!
//! All `core::arch::wasm32` SIMD intrinsics used here are safe functions when the
//! `simd128` target feature is enabled at compile time, which is the only configuration
//! in which this module is compiled. The only `unsafe` code is the unaligned `v128`
//! stores into 64-byte output blocks.

#![allow(clippy::cast_possible_truncation, reason = "counter splitting")]

use crate::{Rounds, STATE_WORDS, Variant};
use core::{arch::wasm32::*, marker::PhantomData};

#[cfg(feature = "cipher")]
use crate::chacha::Block;
#[cfg(feature = "cipher")]
use cipher::{
    BlockSizeUser, ParBlocks, ParBlocksSizeUser, StreamCipherBackend, StreamCipherClosure,
    consts::{U4, U64},
};

const PAR_BLOCKS: usize = 4;

/// Runs `f` with the `simd128` backend and writes the advanced block counter back into
/// `state`.
#[inline]
#[cfg(feature = "cipher")]
pub(crate) fn inner<R, F, V>(state: &mut [u32; STATE_WORDS], f: F)
where
    R: Rounds,
    F: StreamCipherClosure<BlockSize = U64>,
    V: Variant,
{
    let mut backend = Backend::<R, V> {
        state: *state,
        _pd: PhantomData,
    };
    f.call(&mut backend);
    state[12] = backend.state[12];
    if size_of::<V::Counter>() == 8 {
        state[13] = backend.state[13];
    }
}

struct Backend<R: Rounds, V: Variant> {
    state: [u32; STATE_WORDS],
    _pd: PhantomData<(R, V)>,
}

impl<R: Rounds, V: Variant> Backend<R, V> {
    /// The block counter, as a `u64` (the high half is zero for 32-bit counters).
    #[inline(always)]
    fn counter(&self) -> u64 {
        let lo = u64::from(self.state[12]);
        if size_of::<V::Counter>() == 8 {
            lo | (u64::from(self.state[13]) << 32)
        } else {
            lo
        }
    }

    /// Advances the block counter by `n`, wrapping like the soft backend: 32-bit
    /// counters wrap within word 12, 64-bit counters carry into word 13.
    #[inline(always)]
    fn advance(&mut self, n: u64) {
        let ctr = self.counter().wrapping_add(n);
        self.state[12] = ctr as u32;
        if size_of::<V::Counter>() == 8 {
            self.state[13] = (ctr >> 32) as u32;
        }
    }
}

#[cfg(feature = "cipher")]
impl<R: Rounds, V: Variant> BlockSizeUser for Backend<R, V> {
    type BlockSize = U64;
}

#[cfg(feature = "cipher")]
impl<R: Rounds, V: Variant> ParBlocksSizeUser for Backend<R, V> {
    type ParBlocksSize = U4;
}

#[cfg(feature = "cipher")]
impl<R: Rounds, V: Variant> StreamCipherBackend for Backend<R, V> {
    #[inline(always)]
    fn gen_ks_block(&mut self, block: &mut Block) {
        let res = one_block::<R>(&self.state);
        self.advance(1);
        for (i, row) in res.iter().enumerate() {
            // SAFETY: `block` is 64 bytes, so bytes 16*i..16*i+16 (i < 4) are in bounds;
            // `v128_store` has no alignment requirement.
            unsafe { v128_store(block.as_mut_ptr().add(16 * i).cast::<v128>(), *row) };
        }
    }

    #[inline(always)]
    fn gen_par_ks_blocks(&mut self, blocks: &mut ParBlocks<Self>) {
        let res = four_blocks::<R, V>(&self.state);
        self.advance(PAR_BLOCKS as u64);
        for (b, block) in blocks.iter_mut().enumerate() {
            for (g, row) in res[b].iter().enumerate() {
                // SAFETY: each block is 64 bytes, so bytes 16*g..16*g+16 (g < 4) are in
                // bounds; `v128_store` has no alignment requirement.
                unsafe { v128_store(block.as_mut_ptr().add(16 * g).cast::<v128>(), *row) };
            }
        }
    }
}

/// Rotates each 32-bit lane left by 16 bits (a byte shuffle).
#[inline(always)]
fn rotl16(x: v128) -> v128 {
    i8x16_shuffle::<2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13>(x, x)
}

/// Rotates each 32-bit lane left by 8 bits (a byte shuffle).
#[inline(always)]
fn rotl8(x: v128) -> v128 {
    i8x16_shuffle::<3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14>(x, x)
}

/// Rotates each 32-bit lane left by 12 bits.
#[inline(always)]
fn rotl12(x: v128) -> v128 {
    v128_or(u32x4_shl(x, 12), u32x4_shr(x, 20))
}

/// Rotates each 32-bit lane left by 7 bits.
#[inline(always)]
fn rotl7(x: v128) -> v128 {
    v128_or(u32x4_shl(x, 7), u32x4_shr(x, 25))
}

/// Four quarter rounds in parallel, on whole vectors.
#[inline(always)]
fn quarter_round(a: &mut v128, b: &mut v128, c: &mut v128, d: &mut v128) {
    *a = u32x4_add(*a, *b);
    *d = rotl16(v128_xor(*d, *a));
    *c = u32x4_add(*c, *d);
    *b = rotl12(v128_xor(*b, *c));
    *a = u32x4_add(*a, *b);
    *d = rotl8(v128_xor(*d, *a));
    *c = u32x4_add(*c, *d);
    *b = rotl7(v128_xor(*b, *c));
}

/// Quarter round on state words `a`, `b`, `c`, `d` of four blocks at once (vertical
/// layout: vector `i` holds word `i` of each block).
#[inline(always)]
fn quarter_round_words(x: &mut [v128; STATE_WORDS], a: usize, b: usize, c: usize, d: usize) {
    let (mut va, mut vb, mut vc, mut vd) = (x[a], x[b], x[c], x[d]);
    quarter_round(&mut va, &mut vb, &mut vc, &mut vd);
    (x[a], x[b], x[c], x[d]) = (va, vb, vc, vd);
}

/// Computes four consecutive keystream blocks starting at the counter in `state`.
///
/// Returns, for each block, its four 16-byte rows in output (little-endian) order.
#[inline(always)]
fn four_blocks<R: Rounds, V: Variant>(state: &[u32; STATE_WORDS]) -> [[v128; 4]; PAR_BLOCKS] {
    // Per-block counters, with the same wrapping as the soft backend.
    let ctr = if size_of::<V::Counter>() == 8 {
        u64::from(state[12]) | (u64::from(state[13]) << 32)
    } else {
        u64::from(state[12])
    };
    let c = |i: u64| ctr.wrapping_add(i);
    let lo = u32x4(c(0) as u32, c(1) as u32, c(2) as u32, c(3) as u32);
    let hi = if size_of::<V::Counter>() == 8 {
        u32x4(
            (c(0) >> 32) as u32,
            (c(1) >> 32) as u32,
            (c(2) >> 32) as u32,
            (c(3) >> 32) as u32,
        )
    } else {
        u32x4_splat(state[13])
    };

    let mut init = [u32x4_splat(0); STATE_WORDS];
    for (v, w) in init.iter_mut().zip(state.iter()) {
        *v = u32x4_splat(*w);
    }
    init[12] = lo;
    init[13] = hi;

    let mut x = init;
    for _ in 0..R::COUNT {
        // column rounds
        quarter_round_words(&mut x, 0, 4, 8, 12);
        quarter_round_words(&mut x, 1, 5, 9, 13);
        quarter_round_words(&mut x, 2, 6, 10, 14);
        quarter_round_words(&mut x, 3, 7, 11, 15);
        // diagonal rounds
        quarter_round_words(&mut x, 0, 5, 10, 15);
        quarter_round_words(&mut x, 1, 6, 11, 12);
        quarter_round_words(&mut x, 2, 7, 8, 13);
        quarter_round_words(&mut x, 3, 4, 9, 14);
    }
    for (v, s) in x.iter_mut().zip(init.iter()) {
        *v = u32x4_add(*v, *s);
    }

    // Transpose each group of four words (one row of the state) from "lane = block"
    // to "vector = block".
    let mut out = [[u32x4_splat(0); 4]; PAR_BLOCKS];
    for g in 0..4 {
        let (a, b, c, d) = (x[4 * g], x[4 * g + 1], x[4 * g + 2], x[4 * g + 3]);
        // t0 = [a0 b0 a1 b1], t1 = [a2 b2 a3 b3], t2 = [c0 d0 c1 d1], t3 = [c2 d2 c3 d3]
        let t0 = i32x4_shuffle::<0, 4, 1, 5>(a, b);
        let t1 = i32x4_shuffle::<2, 6, 3, 7>(a, b);
        let t2 = i32x4_shuffle::<0, 4, 1, 5>(c, d);
        let t3 = i32x4_shuffle::<2, 6, 3, 7>(c, d);
        out[0][g] = i64x2_shuffle::<0, 2>(t0, t2);
        out[1][g] = i64x2_shuffle::<1, 3>(t0, t2);
        out[2][g] = i64x2_shuffle::<0, 2>(t1, t3);
        out[3][g] = i64x2_shuffle::<1, 3>(t1, t3);
    }
    out
}

/// Computes one keystream block (row layout, as in the SSE2 backend).
#[inline(always)]
fn one_block<R: Rounds>(state: &[u32; STATE_WORDS]) -> [v128; 4] {
    let row = |i: usize| {
        u32x4(
            state[4 * i],
            state[4 * i + 1],
            state[4 * i + 2],
            state[4 * i + 3],
        )
    };
    let init = [row(0), row(1), row(2), row(3)];
    let [mut a, mut b, mut c, mut d] = init;
    for _ in 0..R::COUNT {
        quarter_round(&mut a, &mut b, &mut c, &mut d);
        // Rotate rows so that the columns become the diagonals.
        b = i32x4_shuffle::<1, 2, 3, 0>(b, b);
        c = i32x4_shuffle::<2, 3, 0, 1>(c, c);
        d = i32x4_shuffle::<3, 0, 1, 2>(d, d);
        quarter_round(&mut a, &mut b, &mut c, &mut d);
        b = i32x4_shuffle::<3, 0, 1, 2>(b, b);
        c = i32x4_shuffle::<2, 3, 0, 1>(c, c);
        d = i32x4_shuffle::<1, 2, 3, 0>(d, d);
    }
    [
        u32x4_add(a, init[0]),
        u32x4_add(b, init[1]),
        u32x4_add(c, init[2]),
        u32x4_add(d, init[3]),
    ]
}
