//! torch's and CPython's random numbers, reproduced bit for bit (docs/reference.md §5): the
//! MT19937 generator, `torch.randperm`, `torch.randint` and the 2022 code's `random.shuffle`
//! split.

/// Mersenne Twister MT19937, as torch's CPU generator.
#[derive(Clone)]
pub struct Mt19937 {
    mt: [u32; 624],
    idx: usize,
}

impl Mt19937 {
    /// `torch.manual_seed(seed)`: init_genrand with the seed's low 32 bits.
    pub fn new(seed: u64) -> Mt19937 {
        let mut mt = [0u32; 624];
        mt[0] = seed as u32;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, idx: 624 }
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.idx >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.idx = 0;
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

impl Mt19937 {
    /// CPython's `random.seed(n)` for a non-negative int: `init_by_array` with the 32-bit
    /// words of n, least significant first (`[0]` for 0).
    pub fn python(seed: u64) -> Mt19937 {
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut g = Mt19937::new(19_650_218);
        let mt = &mut g.mt;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        g.idx = 624;
        g
    }

    /// CPython's `random._randbelow(n)` (getrandbits with rejection), for 0 < n < 2³².
    pub fn python_randbelow(&mut self, n: u32) -> u32 {
        let k = 32 - n.leading_zeros(); // n.bit_length()
        loop {
            let r = self.next_u32() >> (32 - k);
            if r < n {
                return r;
            }
        }
    }
}

/// The 2022 original's split (Nanda's grokking code, `gen_train_test`): the pairs (a, b) in
/// a-major order, `random.seed(seed); random.shuffle(pairs)`, the first `int(frac_train·p²)`
/// train. Returned as indices a·p + b into the a-major dataset.
pub fn python_shuffle_split(p: usize, frac_train: f64, seed: u64) -> (Vec<i64>, Vec<i64>) {
    let n = p * p;
    let mut g = Mt19937::python(seed);
    let mut pairs: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = g.python_randbelow(i as u32 + 1) as usize;
        pairs.swap(i, j);
    }
    let cutoff = ((n as f64 * frac_train) as usize).min(n);
    let test = pairs.split_off(cutoff);
    (pairs, test)
}

/// `torch.manual_seed(seed); torch.randperm(n)`.
pub fn torch_randperm(n: usize, seed: u64) -> Vec<i64> {
    let mut g = Mt19937::new(seed);
    let mut r: Vec<i64> = (0..n as i64).collect();
    for i in 0..n.saturating_sub(1) {
        let z = (g.next_u32() as u64 % (n - i) as u64) as usize;
        r.swap(i, i + z);
    }
    r
}

/// `torch.manual_seed(seed); torch.randint(0, high, (n,))` (int64, CPU): each value is
/// `next_u32 % high` (torch's `uniform_int_from_to` for ranges below 2³²).
pub fn torch_randint(n: usize, high: u32, seed: u64) -> Vec<u32> {
    let mut g = Mt19937::new(seed);
    (0..n).map(|_| g.next_u32() % high).collect()
}
