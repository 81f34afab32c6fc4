//! The tables a service's new flows are spread by, built in userspace: Maglev's consistent
//! hashing (maglev, source-hash, and the candidates of lc/wlc) and whole round-robin cycles
//! (rr, wrr). The data path only looks entries up.
pub mod maglev;
pub mod rr;

use crate::config::Scheduler;

pub use maglev::Member;

/// The table of a service with `scheduler` over its usable `members`, at most `size` entries.
pub fn build(scheduler: Scheduler, members: &[Member], size: u32) -> Vec<u32> {
    match scheduler {
        // lc/wlc draw their candidates from the Maglev table: weights and health shape it.
        Scheduler::Maglev | Scheduler::SourceHash | Scheduler::Lc | Scheduler::Wlc => maglev::build(members, size),
        Scheduler::Rr => rr::table(members, size, false),
        Scheduler::Wrr => rr::table(members, size, true),
    }
}
