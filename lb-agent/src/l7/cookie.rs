//! Sticky sessions by cookie, after HAProxy's `cookie insert indirect nocache`: the value is an
//! opaque id of the backend (an HMAC of its address under the service's secret: the same on
//! every host and across restarts, never its position), set only when missing or stale, and
//! taken out of the request before it reaches the backend.
use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderValue};

use crate::config::l7::{CookieConfig, SameSite};

/// The cookie value naming the backend at `address`.
pub fn backend_id(secret: &str, address: SocketAddr) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, address.to_string().as_bytes());
    tag.as_ref()[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes the cookie `name` from the request's Cookie headers; returns its value.
pub fn take(headers: &mut HeaderMap, name: &str) -> Option<String> {
    let mut found = None;
    let mut kept: Vec<String> = Vec::new();
    for value in headers.get_all(header::COOKIE).iter() {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((n, v)) if n.trim() == name => found = Some(v.trim().trim_matches('"').to_string()),
                _ => kept.push(pair.to_string()),
            }
        }
    }
    if found.is_some() {
        headers.remove(header::COOKIE);
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            if !kept.is_empty() {
                headers.insert(header::COOKIE, v);
            }
        }
    }
    found
}

/// Adds the Set-Cookie that pins the client to `id`, and keeps shared caches from storing it.
pub fn insert(headers: &mut HeaderMap, config: &CookieConfig, id: &str, secure: bool) {
    let same_site = match config.same_site {
        SameSite::Lax => "Lax",
        SameSite::Strict => "Strict",
        SameSite::None => "None",
    };
    // Browsers refuse SameSite=None without Secure.
    let secure = if secure || config.same_site == SameSite::None { "; Secure" } else { "" };
    let cookie = format!("{}={id}; Path=/; HttpOnly; SameSite={same_site}{secure}", config.name);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, v);
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache=\"set-cookie\""));
    }
}

/// A 64-bit digest of a header value, for pools that hash on a header.
pub fn digest(bytes: &[u8]) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    u64::from_le_bytes(d.as_ref()[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_opaque_and_keyed() {
        let a: SocketAddr = "10.0.0.11:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.12:80".parse().unwrap();
        assert_eq!(backend_id("a secret of sixteen", a), backend_id("a secret of sixteen", a));
        assert_ne!(backend_id("a secret of sixteen", a), backend_id("a secret of sixteen", b));
        assert_ne!(backend_id("a secret of sixteen", a), backend_id("another secret!!", a));
        assert_eq!(backend_id("a secret of sixteen", a).len(), 24);
        assert!(!backend_id("a secret of sixteen", a).contains("10.0.0.11"));
    }

    #[test]
    fn the_cookie_is_taken_out_of_the_request() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; XLBSRV=abc; b=2"));
        assert_eq!(take(&mut h, "XLBSRV").as_deref(), Some("abc"));
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
        let mut only = HeaderMap::new();
        only.append(header::COOKIE, HeaderValue::from_static("XLBSRV=abc"));
        take(&mut only, "XLBSRV");
        assert!(!only.contains_key(header::COOKIE));
        let mut none = HeaderMap::new();
        none.append(header::COOKIE, HeaderValue::from_static("a=1"));
        assert_eq!(take(&mut none, "XLBSRV"), None);
        assert_eq!(none.get(header::COOKIE).unwrap(), "a=1");
    }

    #[test]
    fn set_cookie_is_http_only_and_secure_on_https() {
        let c = CookieConfig { name: "S".into(), secret: "x".repeat(16), same_site: SameSite::Lax, strict: false };
        let mut h = HeaderMap::new();
        insert(&mut h, &c, "id", true);
        assert_eq!(h.get(header::SET_COOKIE).unwrap(), "S=id; Path=/; HttpOnly; SameSite=Lax; Secure");
        let mut plain = HeaderMap::new();
        insert(&mut plain, &c, "id", false);
        assert_eq!(plain.get(header::SET_COOKIE).unwrap(), "S=id; Path=/; HttpOnly; SameSite=Lax");
    }
}
