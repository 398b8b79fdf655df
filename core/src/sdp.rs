//! The little SDP that the core needs: the DTLS fingerprint, for channel binding.

/// The first `a=fingerprint:` value of `sdp` (session or media level), e.g.
/// `"sha-256 AB:CD:…"`. Both peers must bind the same line, so drivers use this function
/// on both the local and the remote description.
pub fn dtls_fingerprint(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|line| {
        let value = line.trim().strip_prefix("a=fingerprint:")?.trim();
        (!value.is_empty()).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_fingerprint_line() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
                   a=fingerprint:sha-256 AB:CD:EF\r\na=fingerprint:sha-1 00:11\r\n";
        assert_eq!(dtls_fingerprint(sdp), Some("sha-256 AB:CD:EF"));
        assert_eq!(dtls_fingerprint("v=0\r\n"), None);
        assert_eq!(dtls_fingerprint("a=fingerprint:   \r\n"), None);
    }
}
