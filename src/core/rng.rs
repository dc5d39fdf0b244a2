//! A small seeded generator for jitter and rebased op ids.
//!
//! The core draws no randomness of its own: the shell seeds this from `crypto.getRandomValues`,
//! tests seed it with a constant, and the same seed replays the same decisions.

/// xoshiro256** (Blackman and Vigna), seeded through splitmix64. Fast, 256 bits of state, and
/// good enough for jitter and for ids that only need to be unique within one client.
#[derive(Debug, Clone)]
pub struct Rng {
    state: [u64; 4],
}

impl Rng {
    /// A generator whose whole output is fixed by `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let mut state = [0u64; 4];
        for (word, chunk) in state.iter_mut().zip(seed.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        }
        // Pass the words through splitmix64 so that weak seeds (all zero) still give good state.
        let mut mix = state[0] ^ state[1].rotate_left(17) ^ state[2].rotate_left(31) ^ state[3];
        for word in &mut state {
            mix = mix.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = mix ^ *word;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *word = z ^ (z >> 31);
        }
        Rng { state }
    }

    /// A generator seeded from one number, for tests.
    pub fn from_u64(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Self::from_seed(bytes)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let [s0, s1, s2, s3] = &mut self.state;
        let result = s1.wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = *s1 << 17;
        *s2 ^= *s0;
        *s3 ^= *s1;
        *s1 ^= *s2;
        *s0 ^= *s3;
        *s2 ^= t;
        *s3 = s3.rotate_left(45);
        result
    }

    /// A uniform number in `0..=max`, without modulo bias.
    pub fn up_to(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        let span = max + 1;
        // Reject the top sliver of the range that would make low values more likely.
        let zone = u64::MAX - (u64::MAX % span) - 1;
        loop {
            let x = self.next_u64();
            if x <= zone {
                return x % span;
            }
        }
    }

    /// 16 random bytes, for an op id.
    pub fn bytes16(&mut self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        out[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        out
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_sequence_and_different_seeds_differ() {
        let mut a = Rng::from_u64(7);
        let mut b = Rng::from_u64(7);
        let mut c = Rng::from_u64(8);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn up_to_stays_in_range_and_reaches_both_ends() {
        let mut rng = Rng::from_u64(1);
        let draws: Vec<u64> = (0..2000).map(|_| rng.up_to(3)).collect();
        assert!(draws.iter().all(|&d| d <= 3));
        assert!(draws.contains(&0) && draws.contains(&3));
        assert_eq!(rng.up_to(0), 0);
    }
}
