//! Budgets for clients that have not authenticated yet, per source address: how many of their
//! connections may be open at once, and how many enrollment attempts they may make a minute.
//!
//! Anyone on the internet can open a TLS session without a certificate (an agent needs that to
//! enroll). Without a budget per address, one host could hold every connection slot until its
//! hello deadline, again and again, or try tokens as fast as the registry answers. A slot is
//! taken at accept and given back when the connection authenticates or ends; the state of an
//! address is forgotten once it has nothing open and its enrollment budget is full again, so
//! the table stays as small as the set of addresses currently at it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The limits ([`crate::config::GatewayConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct PreAuthLimits {
    /// Connections of one address open without authentication at once.
    pub max_open_per_address: usize,
    /// Enrollment attempts of one address a minute (and at most that many at once).
    pub enrollments_per_min: u32,
}

struct AddressState {
    open: usize,
    /// Enrollment attempts left, refilled continuously.
    enroll_tokens: f64,
    refilled: Instant,
}

/// The shared budgets of one gateway.
pub struct PreAuth {
    addresses: Mutex<HashMap<IpAddr, AddressState>>,
    limits: PreAuthLimits,
    open: AtomicUsize,
}

impl std::fmt::Debug for PreAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreAuth").field("limits", &self.limits).field("open", &self.unauthenticated()).finish()
    }
}

/// A connection's place in its address's budget, until it authenticates or ends.
#[derive(Debug)]
pub struct Slot {
    preauth: Arc<PreAuth>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.preauth.open.fetch_sub(1, Ordering::Relaxed);
        let mut addresses = self.preauth.addresses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = addresses.get_mut(&self.ip) {
            state.open = state.open.saturating_sub(1);
        }
        self.preauth.forget_idle(&mut addresses, self.ip);
    }
}

impl PreAuth {
    pub fn new(limits: PreAuthLimits) -> Arc<PreAuth> {
        Arc::new(PreAuth { addresses: Mutex::new(HashMap::new()), limits, open: AtomicUsize::new(0) })
    }

    pub fn limits(&self) -> PreAuthLimits {
        self.limits
    }

    /// Connections open without authentication, over every address.
    pub fn unauthenticated(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot for a new connection from `ip`, or None when that address has its maximum open.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let state = addresses.entry(ip).or_insert_with(|| self.fresh());
        if state.open >= self.limits.max_open_per_address {
            return None;
        }
        state.open += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot { preauth: self.clone(), ip })
    }

    /// Whether `ip` may try an enrollment now (and counts it).
    pub fn enrollment_allowed(&self, ip: IpAddr) -> bool {
        let rate = f64::from(self.limits.enrollments_per_min) / 60.0;
        let burst = f64::from(self.limits.enrollments_per_min);
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let state = addresses.entry(ip).or_insert_with(|| self.fresh());
        let now = Instant::now();
        state.enroll_tokens =
            (state.enroll_tokens + now.duration_since(state.refilled).as_secs_f64() * rate).min(burst);
        state.refilled = now;
        if state.enroll_tokens >= 1.0 {
            state.enroll_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn fresh(&self) -> AddressState {
        AddressState { open: 0, enroll_tokens: f64::from(self.limits.enrollments_per_min), refilled: Instant::now() }
    }

    /// Drops `ip`'s state once it holds nothing: no open connection, a full enrollment budget.
    fn forget_idle(&self, addresses: &mut HashMap<IpAddr, AddressState>, ip: IpAddr) {
        let burst = f64::from(self.limits.enrollments_per_min);
        let rate = burst / 60.0;
        if let Some(state) = addresses.get(&ip) {
            let refilled = state.enroll_tokens + state.refilled.elapsed().as_secs_f64() * rate;
            if state.open == 0 && refilled >= burst {
                addresses.remove(&ip);
            }
        }
        // Addresses that spent their enrollment budget and left: swept now and then.
        if addresses.len() > 4 * 1024 {
            addresses.retain(|_, s| s.open > 0 || s.enroll_tokens + s.refilled.elapsed().as_secs_f64() * rate < burst);
        }
    }

    #[cfg(test)]
    fn n_addresses(&self) -> usize {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_has_a_budget_of_open_connections_and_enrollments() {
        let preauth = PreAuth::new(PreAuthLimits { max_open_per_address: 2, enrollments_per_min: 3 });
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let first = preauth.open(a).unwrap();
        let second = preauth.open(a).unwrap();
        assert!(preauth.open(a).is_none(), "a third at once is one too many");
        let other = preauth.open(b).expect("another address has its own budget");
        assert_eq!(preauth.unauthenticated(), 3);
        drop(first);
        let third = preauth.open(a).expect("a slot given back is free again");
        drop((second, third, other));
        assert_eq!(preauth.unauthenticated(), 0);
        assert_eq!(preauth.n_addresses(), 0, "nothing kept for addresses that hold nothing");

        assert!((0..3).all(|_| preauth.enrollment_allowed(a)));
        assert!(!preauth.enrollment_allowed(a), "three a minute");
        assert!(preauth.enrollment_allowed(b));
        drop(preauth.open(a));
        assert_eq!(preauth.n_addresses(), 2, "an address that spent its budget is remembered");
    }
}
