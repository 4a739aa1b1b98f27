//! The convergence policy: after each pre-copy round, continue, throttle
//! the guest, stop and copy, or give up. A pure function of the round's
//! measurements, so it is tested on its own.
//!
//! - Stop and copy as soon as sending the remaining dirty pages, and the
//!   bytes still queued for the link, at the measured bandwidth fits the
//!   downtime budget, less the fixed work of the pause (the verify read of
//!   all memory). That work may take at most half the budget: when it
//!   needs more, the transfer still gets half, and the pause will exceed
//!   the budget by what the fixed work overruns (the expected downtime
//!   says so from the first round on).
//! - At `max_rounds`, Abort gives up; Force and Throttle stop and copy
//!   anyway, accepting a longer downtime (so the default always finishes).
//! - A guest whose dirty rate exceeded 90% of the bandwidth for two rounds
//!   in a row does not converge: Throttle takes away CPU in steps of 20%
//!   (up to 80%), one step per such round; Force stops and copies; Abort
//!   gives up.

use crate::PAGE_SIZE;

/// What to do when pre-copy does not converge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// Slow the guest down step by step; stop and copy at `max_rounds`.
    #[default]
    Throttle,
    /// Stop and copy now, accepting a longer downtime.
    Force,
    /// Give up; the VM keeps running on the source.
    Abort,
}

/// The decision after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Another pre-copy round.
    Continue,
    /// Pause the VM and send the rest.
    StopAndCopy,
    /// Set the throttle to this percentage, then another round.
    Throttle(u8),
    /// Give up, VM keeps running.
    Abort,
}

/// Throttle increment, percent of CPU taken away.
pub const THROTTLE_STEP: u8 = 20;
/// Highest throttle.
pub const MAX_THROTTLE: u8 = 80;
/// Consecutive hot rounds after which a guest is non-converging.
pub const HOT_ROUNDS: u32 = 2;
/// Most pre-copy rounds a migration may be given (`migrate ... rounds=`).
/// The last round's number is at most this, so a destination refuses a
/// stream that goes past it: without a limit, a source trickling one page
/// a round held the skeleton and its memory for as long as it liked.
pub const MAX_ROUNDS: u32 = 1000;

/// Measurements after a pre-copy round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// Policy for non-convergence.
    pub policy: Policy,
    /// The round that just ended (0 = the full copy).
    pub round: u32,
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    /// Pages dirtied during the round, still to send.
    pub remaining_pages: u64,
    /// Stream bytes handed to the transport but not yet delivered: they
    /// go out before the last pages do.
    pub backlog_bytes: u64,
    /// Measured bandwidth.
    pub bandwidth_bytes_per_s: u64,
    /// Allowed pause.
    pub downtime_budget_us: u64,
    /// Work of the pause that does not depend on the dirty pages (the
    /// verify digest of all memory), estimated.
    pub fixed_pause_us: u64,
    /// Current throttle (percent).
    pub throttle: u8,
    /// Consecutive rounds, this one included, that were [`is_hot`].
    pub hot_rounds: u32,
}

/// Time to send `pages` after `backlog_bytes` at `bandwidth` bytes/s
/// (`u64::MAX` if unknown/zero).
pub fn transfer_time_us(pages: u64, backlog_bytes: u64, bandwidth_bytes_per_s: u64) -> u64 {
    if bandwidth_bytes_per_s == 0 {
        return u64::MAX;
    }
    let bytes = u128::from(pages) * PAGE_SIZE as u128 + u128::from(backlog_bytes);
    let us = bytes * 1_000_000 / u128::from(bandwidth_bytes_per_s);
    u64::try_from(us).unwrap_or(u64::MAX)
}

/// Whether a dirty rate exceeds 90% of the bandwidth.
pub fn is_hot(dirty_bytes_per_s: u64, bandwidth_bytes_per_s: u64) -> bool {
    u128::from(dirty_bytes_per_s) * 10 > u128::from(bandwidth_bytes_per_s) * 9
}

/// The part of the budget left for sending the rest: the budget less the
/// fixed work of the pause, but never less than half of it.
pub fn transfer_budget_us(i: &Inputs) -> u64 {
    let half = i.downtime_budget_us / 2;
    i.downtime_budget_us.saturating_sub(i.fixed_pause_us).max(half)
}

/// Whether the rest fits the transfer budget.
fn fits(i: &Inputs) -> bool {
    transfer_time_us(i.remaining_pages, i.backlog_bytes, i.bandwidth_bytes_per_s) <= transfer_budget_us(i)
}

/// The decision for `i`.
pub fn decide(i: &Inputs) -> Decision {
    if fits(i) {
        return Decision::StopAndCopy;
    }
    let out_of_rounds = i.round.saturating_add(1) >= i.max_rounds;
    let stuck = i.hot_rounds >= HOT_ROUNDS;
    match i.policy {
        Policy::Abort if out_of_rounds || stuck => Decision::Abort,
        Policy::Force if out_of_rounds || stuck => Decision::StopAndCopy,
        Policy::Throttle if out_of_rounds => Decision::StopAndCopy,
        Policy::Throttle if stuck && i.throttle < MAX_THROTTLE => {
            Decision::Throttle(i.throttle.saturating_add(THROTTLE_STEP).min(MAX_THROTTLE))
        }
        _ => Decision::Continue,
    }
}

/// Why [`decide`] chose `StopAndCopy` for `i`, for the report.
pub fn stop_reason(i: &Inputs) -> &'static str {
    if fits(i) {
        "budget"
    } else if i.round.saturating_add(1) >= i.max_rounds {
        "round limit"
    } else {
        "not converging"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(policy: Policy) -> Inputs {
        Inputs {
            policy,
            round: 3,
            max_rounds: 30,
            remaining_pages: 100_000, // 400 MiB
            backlog_bytes: 0,
            bandwidth_bytes_per_s: 1_000_000_000,
            downtime_budget_us: 300_000,
            fixed_pause_us: 0,
            throttle: 0,
            hot_rounds: 0,
        }
    }

    #[test]
    fn the_verify_read_comes_out_of_the_budget_but_leaves_the_transfer_half() {
        let mut i = inputs(Policy::Throttle);
        i.remaining_pages = 48_828; // 200 ms at 1 GB/s
        assert_eq!(decide(&i), Decision::StopAndCopy);
        i.fixed_pause_us = 80_000; // 256 MiB verified: 220 ms left, 200 fit
        assert_eq!(transfer_budget_us(&i), 220_000);
        assert_eq!(decide(&i), Decision::StopAndCopy);
        i.fixed_pause_us = 120_000; // 180 ms left: 200 do not fit
        assert_eq!(decide(&i), Decision::Continue);
        i.fixed_pause_us = 320_000; // 1 GiB verified: more than the budget alone
        assert_eq!(transfer_budget_us(&i), 150_000, "the transfer keeps half");
        i.remaining_pages = 36_621; // 149.99 ms
        assert_eq!(decide(&i), Decision::StopAndCopy);
        assert_eq!(stop_reason(&i), "budget");
    }

    #[test]
    fn stops_when_the_rest_fits_the_downtime_budget() {
        let mut i = inputs(Policy::Abort);
        assert_eq!(decide(&i), Decision::Continue);
        i.remaining_pages = 73_242; // 299.99 ms at 1 GB/s
        assert_eq!(decide(&i), Decision::StopAndCopy);
        assert_eq!(stop_reason(&i), "budget");
        i.hot_rounds = 5;
        assert_eq!(decide(&i), Decision::StopAndCopy, "fitting the budget beats every policy");
    }

    #[test]
    fn bytes_still_queued_count_against_the_budget() {
        let mut i = inputs(Policy::Throttle);
        i.remaining_pages = 48_828; // 200 ms at 1 GB/s
        assert_eq!(decide(&i), Decision::StopAndCopy);
        i.backlog_bytes = 150_000_000; // another 150 ms before the last pages leave
        assert_eq!(decide(&i), Decision::Continue);
    }

    #[test]
    fn unknown_bandwidth_never_fits_a_budget() {
        assert_eq!(transfer_time_us(1, 0, 0), u64::MAX);
        assert_eq!(transfer_time_us(0, 0, 0), u64::MAX);
        assert_eq!(transfer_time_us(250, 0, 1_024_000), 1_000_000);
        assert_eq!(transfer_time_us(250, 1_024_000, 1_024_000), 2_000_000);
    }

    #[test]
    fn max_rounds_forces_a_finish_except_under_abort() {
        for (policy, want) in [
            (Policy::Throttle, Decision::StopAndCopy),
            (Policy::Force, Decision::StopAndCopy),
            (Policy::Abort, Decision::Abort),
        ] {
            let mut i = inputs(policy);
            i.round = 29;
            assert_eq!(decide(&i), want, "{policy:?}");
            assert_eq!(stop_reason(&i), "round limit");
        }
    }

    #[test]
    fn one_hot_round_is_not_yet_non_converging() {
        for policy in [Policy::Throttle, Policy::Force, Policy::Abort] {
            let mut i = inputs(policy);
            i.hot_rounds = 1;
            assert_eq!(decide(&i), Decision::Continue);
        }
    }

    #[test]
    fn non_converging_guest_is_throttled_step_by_step_up_to_80() {
        let mut i = inputs(Policy::Throttle);
        i.hot_rounds = 2;
        for (from, to) in [(0, 20), (20, 40), (40, 60), (60, 80)] {
            i.throttle = from;
            assert_eq!(decide(&i), Decision::Throttle(to));
        }
        i.throttle = 80;
        assert_eq!(decide(&i), Decision::Continue, "at the top, keep going until max_rounds");
    }

    #[test]
    fn non_converging_guest_is_forced_or_aborted_by_policy() {
        let mut i = inputs(Policy::Force);
        i.hot_rounds = 2;
        assert_eq!(decide(&i), Decision::StopAndCopy);
        assert_eq!(stop_reason(&i), "not converging");
        i.policy = Policy::Abort;
        assert_eq!(decide(&i), Decision::Abort);
    }

    #[test]
    fn hot_means_above_90_percent_of_bandwidth() {
        assert!(!is_hot(900, 1000));
        assert!(is_hot(901, 1000));
        assert!(is_hot(1, 0));
        assert!(!is_hot(0, 0));
    }
}
