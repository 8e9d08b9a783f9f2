//! Sharing an instance's usable connections among bindings: deterministic
//! weighted max-min fair per-pod pools, in whole connections.
//!
//! Each binding asks for a per-pod pool between `min_per_pod` and
//! `max_per_pod` for up to `max_pods` pods at once, with a `weight`.
//!
//! - When every binding's maximum fits, everyone gets its maximum.
//! - When not even the minimums fit, everyone gets its minimum and
//!   [`Allocation::fits`] is false: the controller reports it, it does not
//!   pick whom to starve.
//! - Otherwise a water level rises: at level λ a binding's per-pod grant is
//!   `λ × weight` rounded down, clamped to `[min_per_pod, max_per_pod]`.
//!
//! In whole connections the level rises in steps: a binding's step from a
//! grant of `g` to `g + 1` costs `max_pods` connections and happens at level
//! `(g + 1) / weight`. All steps, ordered by level and then by key, are taken
//! one after another for as long as the next one fits. The first step that
//! does not fit ends the hand-out, even if a cheaper step further on would
//! fit: that leaves fewer connections idle than `max_pods` of the binding
//! whose turn it was, and it is what makes a larger budget never lower any
//! grant (skipping ahead would let a small binding take what a larger one
//! gets back once the budget grows by a single connection).
//!
//! The cut is found by binary search on the level, so allocation costs
//! O(n log n) in the number of bindings whatever the connection counts.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One binding's request for connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PoolRequest {
    /// The binding, as `namespace/name`; unique within one allocation.
    pub key: String,
    /// The most pods holding a pool at once (see [`super::max_pods`]).
    pub max_pods: u32,
    /// The smallest useful pool per pod.
    pub min_per_pod: u32,
    /// The largest pool per pod the workload asks for.
    pub max_per_pod: u32,
    /// Share of contested connections relative to other bindings; at least 1.
    pub weight: u32,
}

impl PoolRequest {
    /// Checks what [`allocate`] needs of a single request: a weight of at
    /// least 1 and a minimum no larger than the maximum.
    pub fn validate(&self) -> Result<(), AllocationError> {
        let Self {
            key,
            max_pods: _,
            min_per_pod,
            max_per_pod,
            weight,
        } = self;
        if *weight == 0 {
            return Err(AllocationError::ZeroWeight { key: key.clone() });
        }
        if min_per_pod > max_per_pod {
            return Err(AllocationError::MinAboveMax {
                key: key.clone(),
                min_per_pod: *min_per_pod,
                max_per_pod: *max_per_pod,
            });
        }
        Ok(())
    }
}

/// Requests [`allocate`] cannot share connections among.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// Two requests carry the same key.
    #[error("binding {key} appears twice in one allocation; each binding must be counted once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// A request has weight 0.
    #[error("binding {key} has weight 0; set a weight of at least 1")]
    ZeroWeight {
        /// The request's key.
        key: String,
    },
    /// A request's minimum is above its maximum.
    #[error(
        "binding {key} asks for at least {min_per_pod} connections per pod but at most {max_per_pod}; lower the minimum or raise the maximum"
    )]
    MinAboveMax {
        /// The request's key.
        key: String,
        /// The minimum per pod.
        min_per_pod: u32,
        /// The maximum per pod.
        max_per_pod: u32,
    },
}

/// The outcome of sharing `usable` connections among bindings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// Per-pod pool granted to each binding, by key.
    pub grants: BTreeMap<String, u32>,
    /// Connections each binding can hold at most: grant × max pods, by key.
    pub connections: BTreeMap<String, u64>,
    /// Whether every binding's minimum fits in `usable`. When false every
    /// binding gets its minimum and `allocated` exceeds `usable`.
    pub fits: bool,
    /// Σ max_pods × min_per_pod.
    pub needed_min: u64,
    /// Σ max_pods × max_per_pod.
    pub requested: u64,
    /// Σ max_pods × grant.
    pub allocated: u64,
    /// The connections that were shared.
    pub usable: u32,
}

impl Allocation {
    /// Usable connections no binding was granted (0 when minimums do not fit).
    pub fn unallocated(&self) -> u64 {
        u64::from(self.usable).saturating_sub(self.allocated)
    }
}

/// Levels are fixed-point numbers `t / 2^LEVEL_FRACTION_BITS`. With weights
/// below 2^32 a binding's steps are more than one unit of `t` apart, so
/// between two neighbouring values of `t` each binding has at most one step.
const LEVEL_FRACTION_BITS: u32 = 32;

/// A level at which every binding is at its maximum: 2^32 × weight ≥ 2^32 >
/// any `max_per_pod`.
const LEVEL_AT_EVERY_MAXIMUM: u128 = 1 << 64;

/// The per-pod grant of `request` at level `t`.
fn grant_at(request: &PoolRequest, t: u128) -> u32 {
    let raw = (t * u128::from(request.weight)) >> LEVEL_FRACTION_BITS;
    u32::try_from(raw)
        .unwrap_or(u32::MAX)
        .clamp(request.min_per_pod, request.max_per_pod)
}

/// Connections taken by the pods of `requests` at level `t`.
fn cost_at(requests: &[&PoolRequest], t: u128) -> u128 {
    requests
        .iter()
        .map(|r| u128::from(r.max_pods) * u128::from(grant_at(r, t)))
        .sum()
}

fn saturating_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// Shares `usable` connections among `requests` (see the module
/// documentation for the rules). The result depends only on the set of
/// requests, not their order. Requests with `max_pods` 0 cost nothing and get
/// their maximum.
pub fn allocate(usable: u32, requests: &[PoolRequest]) -> Result<Allocation, AllocationError> {
    let mut sorted: Vec<&PoolRequest> = requests.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    for pair in sorted.windows(2) {
        if let [a, b] = pair
            && a.key == b.key
        {
            return Err(AllocationError::DuplicateKey { key: a.key.clone() });
        }
    }
    for request in &sorted {
        request.validate()?;
    }

    let total = |per_pod: fn(&PoolRequest) -> u32| -> u128 {
        sorted
            .iter()
            .map(|r| u128::from(r.max_pods) * u128::from(per_pod(r)))
            .sum()
    };
    let needed_min = total(|r| r.min_per_pod);
    let requested = total(|r| r.max_per_pod);
    let budget = u128::from(usable);
    let fits = needed_min <= budget;

    let mut grants: BTreeMap<&str, u32> = BTreeMap::new();
    if requested <= budget {
        grants.extend(sorted.iter().map(|r| (r.key.as_str(), r.max_per_pod)));
    } else if !fits {
        grants.extend(sorted.iter().map(|r| {
            let grant = if r.max_pods == 0 {
                r.max_per_pod
            } else {
                r.min_per_pod
            };
            (r.key.as_str(), grant)
        }));
    } else {
        let (idle, active): (Vec<&PoolRequest>, Vec<&PoolRequest>) =
            sorted.iter().copied().partition(|r| r.max_pods == 0);
        grants.extend(idle.iter().map(|r| (r.key.as_str(), r.max_per_pod)));
        water_fill(budget, &active, &mut grants);
    }

    let allocated: u128 = sorted
        .iter()
        .map(|r| {
            let grant = grants.get(r.key.as_str()).copied().unwrap_or(r.min_per_pod);
            u128::from(r.max_pods) * u128::from(grant)
        })
        .sum();
    let connections = sorted
        .iter()
        .map(|r| {
            let grant = grants.get(r.key.as_str()).copied().unwrap_or(r.min_per_pod);
            (r.key.clone(), u64::from(r.max_pods) * u64::from(grant))
        })
        .collect();
    Ok(Allocation {
        grants: grants
            .into_iter()
            .map(|(key, grant)| (key.to_owned(), grant))
            .collect(),
        connections,
        fits,
        needed_min: saturating_u64(needed_min),
        requested: saturating_u64(requested),
        allocated: saturating_u64(allocated),
        usable,
    })
}

/// Grants to `active` (all with pods, sorted by key) the longest prefix of
/// steps, in (level, key) order, that fits in `budget`. Requires that the
/// minimums fit and the maximums do not.
fn water_fill<'a>(budget: u128, active: &[&'a PoolRequest], grants: &mut BTreeMap<&'a str, u32>) {
    // Invariant: cost_at(low) <= budget < cost_at(high).
    let mut low: u128 = 0;
    let mut high: u128 = LEVEL_AT_EVERY_MAXIMUM;
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if cost_at(active, mid) <= budget {
            low = mid;
        } else {
            high = mid;
        }
    }
    let mut left = budget.saturating_sub(cost_at(active, low));

    // Steps between `low` and `low + 1`: at most one per binding, and
    // together they do not fit, so the hand-out ends among them.
    let mut next_steps: Vec<(&PoolRequest, u32)> = Vec::new();
    for request in active {
        let grant = grant_at(request, low);
        grants.insert(request.key.as_str(), grant);
        if grant_at(request, low + 1) > grant {
            next_steps.push((request, grant));
        }
    }
    next_steps.sort_by(|(a, grant_a), (b, grant_b)| {
        step_level_order(*grant_a, a.weight, *grant_b, b.weight).then_with(|| a.key.cmp(&b.key))
    });
    for (request, grant) in next_steps {
        let cost = u128::from(request.max_pods);
        if cost > left {
            break;
        }
        left -= cost;
        grants.insert(request.key.as_str(), grant.saturating_add(1));
    }
}

/// Compares the levels `(grant + 1) / weight` of two steps exactly.
fn step_level_order(grant_a: u32, weight_a: u32, grant_b: u32, weight_b: u32) -> Ordering {
    let a = (u128::from(grant_a) + 1) * u128::from(weight_b);
    let b = (u128::from(grant_b) + 1) * u128::from(weight_a);
    a.cmp(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(
        key: &str,
        max_pods: u32,
        min_per_pod: u32,
        max_per_pod: u32,
        weight: u32,
    ) -> PoolRequest {
        PoolRequest {
            key: key.to_owned(),
            max_pods,
            min_per_pod,
            max_per_pod,
            weight,
        }
    }

    fn grants_of(allocation: &Allocation) -> Vec<(&str, u32)> {
        allocation
            .grants
            .iter()
            .map(|(key, grant)| (key.as_str(), *grant))
            .collect()
    }

    fn allocated(usable: u32, requests: &[PoolRequest]) -> Allocation {
        match allocate(usable, requests) {
            Ok(allocation) => allocation,
            Err(error) => panic!("allocation failed: {error}"),
        }
    }

    #[test]
    fn everyone_gets_their_maximum_when_it_fits() {
        let allocation = allocated(
            100,
            &[request("a/x", 3, 2, 10, 1), request("a/y", 2, 1, 20, 5)],
        );
        assert_eq!(grants_of(&allocation), [("a/x", 10), ("a/y", 20)]);
        assert!(allocation.fits);
        assert_eq!(allocation.allocated, 70);
        assert_eq!(allocation.requested, 70);
        assert_eq!(allocation.unallocated(), 30);
        assert_eq!(allocation.connections.get("a/y"), Some(&40));
    }

    #[test]
    fn equal_bindings_share_equally() {
        let requests = [
            request("ns/a", 2, 1, 10, 1),
            request("ns/b", 2, 1, 10, 1),
            request("ns/c", 2, 1, 10, 1),
        ];
        let allocation = allocated(30, &requests);
        assert_eq!(
            grants_of(&allocation),
            [("ns/a", 5), ("ns/b", 5), ("ns/c", 5)]
        );
        assert_eq!(allocation.allocated, 30);
    }

    #[test]
    fn double_weight_gets_double_the_pool() {
        let allocation = allocated(
            30,
            &[
                request("ns/heavy", 1, 0, 100, 2),
                request("ns/light", 1, 0, 100, 1),
            ],
        );
        assert_eq!(grants_of(&allocation), [("ns/heavy", 20), ("ns/light", 10)]);
    }

    #[test]
    fn what_a_capped_binding_leaves_goes_to_the_others() {
        let allocation = allocated(
            30,
            &[
                request("ns/capped", 1, 0, 5, 1),
                request("ns/hungry", 1, 0, 100, 1),
            ],
        );
        assert_eq!(
            grants_of(&allocation),
            [("ns/capped", 5), ("ns/hungry", 25)]
        );
    }

    #[test]
    fn minimums_hold_below_the_water_level() {
        let allocation = allocated(
            20,
            &[
                request("ns/floor", 1, 10, 100, 1),
                request("ns/weighty", 1, 0, 100, 10),
            ],
        );
        assert_eq!(
            grants_of(&allocation),
            [("ns/floor", 10), ("ns/weighty", 10)]
        );
    }

    #[test]
    fn leftover_goes_one_step_at_a_time_in_level_then_key_order() {
        // Level 1 costs 11; at level 2 "ns/a" (1 pod) comes first and fits,
        // "ns/b" (10 pods) does not.
        let allocation = allocated(
            15,
            &[request("ns/a", 1, 0, 10, 1), request("ns/b", 10, 0, 10, 1)],
        );
        assert_eq!(grants_of(&allocation), [("ns/a", 2), ("ns/b", 1)]);
        assert_eq!(allocation.unallocated(), 3);
    }

    #[test]
    fn leftover_too_small_for_the_next_in_line_stays_unallocated() {
        // At level 2 "ns/big" comes first by key and needs 10; the hand-out
        // stops there rather than letting "ns/small" jump the queue.
        let allocation = allocated(
            15,
            &[
                request("ns/big", 10, 0, 10, 1),
                request("ns/small", 1, 0, 10, 1),
            ],
        );
        assert_eq!(grants_of(&allocation), [("ns/big", 1), ("ns/small", 1)]);
        assert_eq!(allocation.unallocated(), 4);
    }

    #[test]
    fn minimums_that_do_not_fit_give_everyone_their_minimum() {
        let allocation = allocated(
            10,
            &[
                request("ns/a", 4, 2, 10, 1),
                request("ns/b", 3, 1, 10, 3),
                request("ns/idle", 0, 1, 7, 1),
            ],
        );
        assert!(!allocation.fits);
        assert_eq!(
            grants_of(&allocation),
            [("ns/a", 2), ("ns/b", 1), ("ns/idle", 7)]
        );
        assert_eq!(allocation.needed_min, 11);
        assert_eq!(allocation.allocated, 11);
        assert_eq!(allocation.unallocated(), 0);
    }

    #[test]
    fn bindings_without_pods_get_their_maximum_for_free() {
        let allocation = allocated(
            10,
            &[
                request("ns/busy", 5, 0, 10, 1),
                request("ns/scaled-to-zero", 0, 0, 50, 1),
            ],
        );
        assert_eq!(
            grants_of(&allocation),
            [("ns/busy", 2), ("ns/scaled-to-zero", 50)]
        );
        assert_eq!(allocation.connections.get("ns/scaled-to-zero"), Some(&0));
    }

    #[test]
    fn no_usable_connections_with_zero_minimums_grants_zero() {
        let allocation = allocated(0, &[request("ns/a", 2, 0, 10, 1)]);
        assert!(allocation.fits);
        assert_eq!(grants_of(&allocation), [("ns/a", 0)]);
    }

    #[test]
    fn no_requests_allocate_nothing() {
        let allocation = allocated(50, &[]);
        assert!(allocation.grants.is_empty());
        assert!(allocation.fits);
        assert_eq!(allocation.allocated, 0);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let allocation = allocated(
            u32::MAX,
            &[
                request("ns/a", u32::MAX, 0, u32::MAX, u32::MAX),
                request("ns/b", u32::MAX, 1, u32::MAX, 1),
                request("ns/c", 1, 0, u32::MAX, u32::MAX),
            ],
        );
        assert!(allocation.fits);
        assert!(allocation.allocated <= u64::from(u32::MAX));
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let result = allocate(
            10,
            &[request("ns/a", 1, 0, 1, 1), request("ns/a", 1, 0, 1, 1)],
        );
        assert_eq!(
            result,
            Err(AllocationError::DuplicateKey { key: "ns/a".into() })
        );
    }

    #[test]
    fn zero_weight_is_rejected() {
        let result = allocate(10, &[request("ns/a", 1, 0, 1, 0)]);
        assert_eq!(
            result,
            Err(AllocationError::ZeroWeight { key: "ns/a".into() })
        );
    }

    #[test]
    fn minimum_above_maximum_is_rejected() {
        let result = allocate(10, &[request("ns/a", 1, 5, 4, 1)]);
        assert_eq!(
            result,
            Err(AllocationError::MinAboveMax {
                key: "ns/a".into(),
                min_per_pod: 5,
                max_per_pod: 4
            })
        );
    }

    /// A small deterministic generator, so the large test needs no RNG crate.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, bound: u32) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            u32::try_from((self.0 >> 33) % u64::from(bound)).unwrap_or(0)
        }
    }

    #[test]
    fn allocating_ten_thousand_bindings_completes() {
        let mut rng = Lcg(7);
        let requests: Vec<PoolRequest> = (0..10_000)
            .map(|i| {
                let min = rng.below(4);
                request(
                    &format!("ns-{}/binding-{i}", i % 37),
                    rng.below(50),
                    min,
                    min + rng.below(40),
                    1 + rng.below(10),
                )
            })
            .collect();
        let needed_min: u64 = requests
            .iter()
            .map(|r| u64::from(r.max_pods) * u64::from(r.min_per_pod))
            .sum();
        let usable = u32::try_from(needed_min + 100_000).unwrap_or(u32::MAX);
        let allocation = allocated(usable, &requests);
        assert!(allocation.fits);
        assert!(
            allocation.requested > u64::from(usable),
            "the test must contend"
        );
        assert!(allocation.allocated <= u64::from(usable));
        assert_eq!(allocation.grants.len(), requests.len());
        for r in &requests {
            let grant = allocation.grants.get(&r.key).copied();
            assert!(
                grant.is_some_and(|g| (r.min_per_pod..=r.max_per_pod).contains(&g)),
                "{r:?}"
            );
        }
    }

    /// The rules taken literally, one step at a time: the definition the
    /// binary search must agree with. Only for small numbers.
    fn step_by_step(usable: u32, requests: &[PoolRequest]) -> BTreeMap<String, u32> {
        let mut grants: BTreeMap<String, u32> = BTreeMap::new();
        let needed: u64 = requests
            .iter()
            .map(|r| u64::from(r.max_pods) * u64::from(r.min_per_pod))
            .sum();
        let requested: u64 = requests
            .iter()
            .map(|r| u64::from(r.max_pods) * u64::from(r.max_per_pod))
            .sum();
        for r in requests {
            let grant = if r.max_pods == 0 || requested <= u64::from(usable) {
                r.max_per_pod
            } else {
                r.min_per_pod
            };
            grants.insert(r.key.clone(), grant);
        }
        if needed > u64::from(usable) || requested <= u64::from(usable) {
            return grants;
        }
        let mut left = u64::from(usable) - needed;
        loop {
            let next = requests
                .iter()
                .filter(|r| r.max_pods > 0 && grants[&r.key] < r.max_per_pod)
                .min_by(|a, b| {
                    step_level_order(grants[&a.key], a.weight, grants[&b.key], b.weight)
                        .then_with(|| a.key.cmp(&b.key))
                });
            match next {
                Some(r) if u64::from(r.max_pods) <= left => {
                    left -= u64::from(r.max_pods);
                    if let Some(grant) = grants.get_mut(&r.key) {
                        *grant += 1;
                    }
                }
                _ => return grants,
            }
        }
    }

    fn requests_from(specs: Vec<(u32, u32, u32, u32)>) -> Vec<PoolRequest> {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (pods, min, extra, weight))| {
                request(&format!("ns/b{i:02}"), pods, min, min + extra, weight)
            })
            .collect()
    }

    fn arb_requests() -> impl Strategy<Value = Vec<PoolRequest>> {
        prop::collection::vec((0u32..12, 0u32..6, 0u32..25, 1u32..6), 0..12).prop_map(requests_from)
    }

    proptest! {
        #[test]
        fn binary_search_agrees_with_taking_steps_one_at_a_time(requests in arb_requests(), usable in 0u32..3_000) {
            prop_assert_eq!(allocated(usable, &requests).grants, step_by_step(usable, &requests));
        }

        #[test]
        fn grants_stay_within_usable_when_minimums_fit(requests in arb_requests(), usable in 0u32..3_000) {
            let allocation = allocated(usable, &requests);
            let sum: u64 = requests.iter().map(|r| u64::from(r.max_pods) * u64::from(allocation.grants[&r.key])).sum();
            prop_assert_eq!(sum, allocation.allocated);
            if allocation.fits {
                prop_assert!(sum <= u64::from(usable));
            }
        }

        #[test]
        fn every_grant_is_within_its_bounds(requests in arb_requests(), usable in 0u32..3_000) {
            let allocation = allocated(usable, &requests);
            prop_assert_eq!(allocation.grants.len(), requests.len());
            for r in &requests {
                let grant = allocation.grants[&r.key];
                prop_assert!(r.min_per_pod <= grant && grant <= r.max_per_pod, "{:?} got {}", r, grant);
            }
        }

        #[test]
        fn heavier_weight_never_gets_less(
            others in arb_requests(),
            (pods, min, extra) in (1u32..12, 0u32..6, 0u32..25),
            (light, more) in (1u32..6, 1u32..6),
            usable in 0u32..3_000,
        ) {
            let mut requests = others;
            requests.push(request("zz/heavy", pods, min, min + extra, light + more));
            requests.push(request("aa/light", pods, min, min + extra, light));
            let allocation = allocated(usable, &requests);
            prop_assert!(allocation.grants["zz/heavy"] >= allocation.grants["aa/light"]);
        }

        #[test]
        fn order_of_requests_does_not_matter(
            (requests, shuffled) in arb_requests().prop_flat_map(|r| (Just(r.clone()), Just(r).prop_shuffle())),
            usable in 0u32..3_000,
        ) {
            prop_assert_eq!(allocated(usable, &requests), allocated(usable, &shuffled));
        }

        #[test]
        fn raising_usable_never_lowers_a_grant(requests in arb_requests(), usable in 0u32..3_000, more in 0u32..500) {
            let before = allocated(usable, &requests);
            let after = allocated(usable + more, &requests);
            for (key, grant) in &before.grants {
                prop_assert!(after.grants[key] >= *grant, "{} went from {} to {}", key, grant, after.grants[key]);
            }
        }

        #[test]
        fn everyone_gets_their_maximum_when_everything_fits(requests in arb_requests(), spare in 0u32..100) {
            let requested: u64 = requests.iter().map(|r| u64::from(r.max_pods) * u64::from(r.max_per_pod)).sum();
            let usable = u32::try_from(requested).unwrap_or(u32::MAX).saturating_add(spare);
            let allocation = allocated(usable, &requests);
            for r in &requests {
                prop_assert_eq!(allocation.grants[&r.key], r.max_per_pod);
            }
        }

        #[test]
        fn leftover_is_too_small_for_the_next_in_line(requests in arb_requests(), usable in 0u32..3_000) {
            let allocation = allocated(usable, &requests);
            if allocation.fits && allocation.requested > u64::from(usable) {
                let left = allocation.unallocated();
                let someone_could_not_step = requests.iter().any(|r| {
                    allocation.grants[&r.key] < r.max_per_pod && u64::from(r.max_pods) > left
                });
                prop_assert!(someone_could_not_step, "{} connections left idle", left);
            }
        }
    }
}
