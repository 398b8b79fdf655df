//! The little SDP that the core needs: the DTLS fingerprint, for channel binding, and
//! the data channels' largest message.

/// The largest data-channel message when a description says nothing (RFC 8841, 6.1).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// The largest data-channel message `sdp` says its side can receive: its
/// `a=max-message-size:` value (RFC 8841), [`DEFAULT_MAX_MESSAGE_SIZE`] without one or
/// with a value that does not parse, and `usize::MAX` for 0 ("no limit").
pub fn max_message_size(sdp: &str) -> usize {
    let value = sdp.lines().find_map(|line| line.trim().strip_prefix("a=max-message-size:"));
    match value.map(|v| v.trim().parse::<u64>()) {
        Some(Ok(0)) => usize::MAX,
        Some(Ok(n)) => usize::try_from(n).unwrap_or(usize::MAX),
        _ => DEFAULT_MAX_MESSAGE_SIZE,
    }
}

/// The first `a=fingerprint:` value of `sdp` (session or media level), e.g.
/// `"sha-256 AB:CD:…"`. Both peers must bind the same line, so drivers use this function
/// on both the local and the remote description.
pub fn dtls_fingerprint(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|line| {
        let value = line.trim().strip_prefix("a=fingerprint:")?.trim();
        (!value.is_empty()).then_some(value)
    })
}

/// Why a description's DTLS fingerprint cannot bind a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FingerprintProblem {
    /// No `a=fingerprint:` line.
    #[error("no DTLS fingerprint")]
    Missing,
    /// Lines with different fingerprints: DTLS accepts a certificate that matches any of
    /// them, so binding one would not bind the certificate DTLS checked.
    #[error("more than one DTLS fingerprint")]
    Several,
}

/// The description's one DTLS fingerprint, for channel binding: its `a=fingerprint:`
/// lines (session or media level, repeated) must all name the same one (compared without
/// regard to case or spacing).
pub fn the_dtls_fingerprint(sdp: &str) -> Result<&str, FingerprintProblem> {
    let normalize =
        |v: &str| v.split_ascii_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase();
    let mut values = sdp.lines().filter_map(|line| {
        let value = line.trim().strip_prefix("a=fingerprint:")?.trim();
        (!value.is_empty()).then_some(value)
    });
    let first = values.next().ok_or(FingerprintProblem::Missing)?;
    let key = normalize(first);
    if values.any(|v| normalize(v) != key) {
        return Err(FingerprintProblem::Several);
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_fingerprint_is_the_only_one() {
        let one =
            "a=fingerprint:sha-256 AB:CD\r\nm=application 9 x\r\na=fingerprint:sha-256 ab:cd\r\n";
        assert_eq!(the_dtls_fingerprint(one), Ok("sha-256 AB:CD"));
        let two = "a=fingerprint:sha-256 AB:CD\r\na=fingerprint:sha-256 EE:EE\r\n";
        assert_eq!(the_dtls_fingerprint(two), Err(FingerprintProblem::Several));
        let other_hash = "a=fingerprint:sha-256 AB:CD\r\na=fingerprint:sha-1 00:11\r\n";
        assert_eq!(the_dtls_fingerprint(other_hash), Err(FingerprintProblem::Several));
        assert_eq!(the_dtls_fingerprint("v=0\r\n"), Err(FingerprintProblem::Missing));
    }

    #[test]
    fn finds_the_first_fingerprint_line() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
                   a=fingerprint:sha-256 AB:CD:EF\r\na=fingerprint:sha-1 00:11\r\n";
        assert_eq!(dtls_fingerprint(sdp), Some("sha-256 AB:CD:EF"));
        assert_eq!(dtls_fingerprint("v=0\r\n"), None);
        assert_eq!(dtls_fingerprint("a=fingerprint:   \r\n"), None);
    }
}
