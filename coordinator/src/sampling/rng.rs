//! The sampler's random numbers: xoshiro256** (Blackman & Vigna, <https://prng.di.unimi.it/>) seeded through
//! SplitMix64, written out here so that a seed gives the same tokens in every Tessera version (a library
//! generator may change its algorithm between releases).

/// xoshiro256** state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Seeds all 256 bits from `seed` with SplitMix64 (the seeding the algorithm's authors recommend).
    pub fn from_seed(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// A seed from the process's random hash keys and the clock, for requests that give none.
    pub fn entropy_seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::hash::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write_u128(nanos);
        h.finish()
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sequence() {
        // Pinned outputs: changing them changes every seeded completion, so this must never be edited.
        // Computed with an independent Python transcription of the reference C (splitmix64.c,
        // xoshiro256starstar.c); SplitMix64's first output for seed 0 is the published 0xE220A8397B1DCDAF.
        let mut r = Rng::from_seed(42);
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, PINNED_SEED_42);
        let mut r = Rng::from_seed(0);
        // Rng's first state word is SplitMix64's first output.
        assert_eq!(r.s[0], 0xE220_A839_7B1D_CDAF);
        let f = r.next_f64();
        assert!((0.0..1.0).contains(&f));
    }

    const PINNED_SEED_42: [u64; 4] = [
        1546998764402558742,
        6990951692964543102,
        12544586762248559009,
        17057574109182124193,
    ];
}
