//! The binary operations mod p: the 2022 code's `fns_dict` and the Power et al. (2022) list.

/// A binary operation mod p on inputs `[a, b, =]`: the 2022 code's `fns_dict` (docs/reference.md §11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// (a + b) mod p — the TL demo's and the paper's task.
    Add,
    /// (a − b) mod p.
    Subtract,
    /// (a² + ab + b²) mod p.
    X2xyy2,
    /// (a · b) mod p (Power et al.).
    Mul,
    /// (a² + b²) mod p (Power et al.).
    X2y2,
    /// (a² + ab + b² + a) mod p (Power et al.).
    X2xyy2x,
    /// (a³ + ab) mod p (Power et al.).
    X3xy,
    /// (a³ + ab² + b) mod p (Power et al.).
    X3xy2y,
    /// A random table. The 2022 code drew it from numpy's unseeded global generator, so no
    /// file says what it was; tlens draws it as `torch.manual_seed(seed); torch.randint(0, p,
    /// (p*p,))` from the run's data seed ([`super::torch_randint`]), recorded in the run as
    /// `rand_seed` ([`Operation::label`] is `None`: the table is needed).
    Rand,
    /// a · b⁻¹ mod p (Power et al.), p prime; pairs with b = 0 are excluded.
    Div,
    /// a · b⁻¹ mod p if b is odd, else (a − b) mod p (Power et al.), p prime; b = 0 excluded.
    Mix1,
}

impl Operation {
    /// The operations `tlens train --op` takes: the Power et al. (2022) list.
    pub const TRAINABLE: [Operation; 11] = [
        Operation::Add,
        Operation::Subtract,
        Operation::Mul,
        Operation::Div,
        Operation::X2y2,
        Operation::X2xyy2,
        Operation::X2xyy2x,
        Operation::X3xy,
        Operation::X3xy2y,
        Operation::Mix1,
        Operation::Rand,
    ];

    /// Whether the pairs with b = 0 are excluded (b⁻¹ is undefined): div and mix1.
    pub fn excludes_b_zero(self) -> bool {
        matches!(self, Operation::Div | Operation::Mix1)
    }

    /// From the 2022 `Config.fn_name` or tlens's `--op` (`sub` = `subtract`).
    pub fn from_2022_name(name: &str) -> Option<Operation> {
        Some(match name {
            "add" => Operation::Add,
            "subtract" | "sub" => Operation::Subtract,
            "x2xyy2" => Operation::X2xyy2,
            "mul" => Operation::Mul,
            "x2y2" => Operation::X2y2,
            "x2xyy2x" => Operation::X2xyy2x,
            "x3xy" => Operation::X3xy,
            "x3xy2y" => Operation::X3xy2y,
            "rand" => Operation::Rand,
            "div" => Operation::Div,
            "mix1" => Operation::Mix1,
            _ => return None,
        })
    }

    /// The 2022 code's name.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Add => "add",
            Operation::Subtract => "subtract",
            Operation::X2xyy2 => "x2xyy2",
            Operation::Mul => "mul",
            Operation::X2y2 => "x2y2",
            Operation::X2xyy2x => "x2xyy2x",
            Operation::X3xy => "x3xy",
            Operation::X3xy2y => "x3xy2y",
            Operation::Rand => "rand",
            Operation::Div => "div",
            Operation::Mix1 => "mix1",
        }
    }

    /// The formula, for reports.
    pub fn formula(self) -> &'static str {
        match self {
            Operation::Add => "a + b",
            Operation::Subtract => "a - b",
            Operation::X2xyy2 => "a^2 + ab + b^2",
            Operation::Mul => "a * b",
            Operation::X2y2 => "a^2 + b^2",
            Operation::X2xyy2x => "a^2 + ab + b^2 + a",
            Operation::X3xy => "a^3 + ab",
            Operation::X3xy2y => "a^3 + ab^2 + b",
            Operation::Rand => "random table",
            Operation::Div => "a / b",
            Operation::Mix1 => "a / b if b odd else a - b",
        }
    }

    /// The label of (a, b) mod p (`None` for `rand`, whose label is a table's, and for b = 0
    /// in div and mix1). Division takes b⁻¹ = b^(p−2) mod p, which is the inverse for prime p.
    pub fn label(self, a: usize, b: usize, p: usize) -> Option<u32> {
        let (a, b) = (a % p, b % p);
        if self.excludes_b_zero() {
            if b == 0 {
                return None;
            }
            let div = (a as u128 * pow_mod(b as u128, p as u128 - 2, p as u128) % p as u128) as u32;
            return Some(match self {
                Operation::Mix1 if b % 2 == 0 => ((a + p - b) % p) as u32,
                _ => div,
            });
        }
        Some(match self {
            Operation::Add => (a + b) % p,
            Operation::Subtract => (a + p - b) % p,
            // a, b < p ≤ 2³²: the products fit in u128.
            Operation::X2xyy2
            | Operation::Mul
            | Operation::X2y2
            | Operation::X2xyy2x
            | Operation::X3xy
            | Operation::X3xy2y => {
                let (a, b, p) = (a as u128, b as u128, p as u128);
                (match self {
                    Operation::X2xyy2 => a * a + a * b + b * b,
                    Operation::Mul => a * b,
                    Operation::X2y2 => a * a + b * b,
                    Operation::X2xyy2x => a * a + a * b + b * b + a,
                    Operation::X3xy => a * a % p * a + a * b,
                    _ => a * a % p * a + a * b % p * b + b,
                } % p) as usize
            }
            Operation::Rand | Operation::Div | Operation::Mix1 => return None,
        } as u32)
    }
}

fn pow_mod(mut b: u128, mut e: u128, m: u128) -> u128 {
    let mut r = 1 % m;
    b %= m;
    while e > 0 {
        if e & 1 == 1 {
            r = r * b % m;
        }
        b = b * b % m;
        e >>= 1;
    }
    r
}

/// Whether p is prime (trial division; p ≤ 2³² in practice).
pub fn is_prime(p: usize) -> bool {
    p >= 2
        && (2..)
            .take_while(|d| d * d <= p)
            .all(|d| !p.is_multiple_of(d))
}
