//! Whose file offers a receiver takes: one rule for every driver.
//!
//! A member of the network can offer files to anyone; what lands on the disk is the
//! receiver's call. [`AcceptPolicy`] turns what the user said (`--accept-from` on the
//! command line, or nothing) and what the node knows of the offering peer (its key, the
//! name that key is pinned under, whether that key changed) into an [`OfferVerdict`]:
//! accept, decline with a reason the driver prints, or ask the person at the terminal.
//! Without a rule nothing is accepted silently: the driver asks where someone can answer
//! and declines otherwise (see `SECURITY.md`, "Receiving never plants files").

use std::fmt;

use super::PeerInfo;
use super::route::{PeerRef, PeerRefError};
use crate::trust::Trust;

/// Whose offers are taken without asking.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcceptPolicy {
    /// Every member whose key did not change (`any`).
    any: bool,
    /// These peers, by pinned name, key or safety code (a changed key only by key).
    named: Vec<PeerRef>,
}

/// What to do with an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferVerdict {
    /// Take it.
    Accept,
    /// Ask the person at the terminal (or the UI); where nobody can answer, decline
    /// with [`DeclineReason::NobodyToAsk`].
    Ask,
    /// Decline it, for this reason.
    Decline(DeclineReason),
}

/// Why an offer is declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeclineReason {
    /// The peer's key is not the one pinned for its name: only its key can name it now.
    KeyChanged,
    /// The rules name other peers only.
    NotListed,
    /// No rule was given and nobody is there to ask.
    NobodyToAsk,
    /// The person asked said no.
    Refused,
    /// The peer has not said who it is yet (no authenticated key).
    Unauthenticated,
}

impl DeclineReason {
    /// A short token for machine-readable output.
    pub fn as_str(self) -> &'static str {
        match self {
            DeclineReason::KeyChanged => "key_changed",
            DeclineReason::NotListed => "not_listed",
            DeclineReason::NobodyToAsk => "nobody_to_ask",
            DeclineReason::Refused => "refused",
            DeclineReason::Unauthenticated => "unauthenticated",
        }
    }
}

impl fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeclineReason::KeyChanged => {
                "its key changed; accept it by its new fingerprint if that is expected"
            }
            DeclineReason::NotListed => "not in --accept-from",
            DeclineReason::NobodyToAsk => {
                "no --accept-from given and no terminal to ask on (give --accept-from PEER, \
                 or `any`)"
            }
            DeclineReason::Refused => "refused",
            DeclineReason::Unauthenticated => "it has not proven its key yet",
        })
    }
}

impl AcceptPolicy {
    /// No rule: every offer is a question for the user.
    pub fn ask() -> Self {
        Self::default()
    }

    /// The rule from the user's words: `any`, or peers by pinned name, key fingerprint,
    /// safety code or peer id. No words: [`AcceptPolicy::ask`].
    pub fn from_words<S: AsRef<str>>(words: &[S]) -> Result<Self, PeerRefError> {
        let mut policy = Self::ask();
        for word in words {
            let word = word.as_ref();
            if word.trim().eq_ignore_ascii_case("any") {
                policy.any = true;
            } else {
                policy.named.push(PeerRef::new(word)?);
            }
        }
        Ok(policy)
    }

    /// Whether the user gave any rule (else every offer is asked about).
    pub fn has_rule(&self) -> bool {
        self.any || !self.named.is_empty()
    }

    /// What to do with an offer from the member `peer` describes (`None`: a member the
    /// node no longer knows).
    ///
    /// A peer named by the user is taken, even with a changed key, since only its key
    /// can name it then. Otherwise a changed key is declined whatever the rule (`any`
    /// means any member whose key is the one pinned for its name). With no rule at all,
    /// the answer is [`OfferVerdict::Ask`].
    pub fn judge(&self, peer: Option<&PeerInfo>) -> OfferVerdict {
        let Some(peer) = peer.filter(|p| p.fingerprint.is_some()) else {
            return OfferVerdict::Decline(DeclineReason::Unauthenticated);
        };
        if self.named.iter().any(|r| r.names(peer)) {
            return OfferVerdict::Accept;
        }
        if matches!(peer.trust, Some(Trust::Changed { .. })) {
            return OfferVerdict::Decline(DeclineReason::KeyChanged);
        }
        if self.any {
            OfferVerdict::Accept
        } else if self.named.is_empty() {
            OfferVerdict::Ask
        } else {
            OfferVerdict::Decline(DeclineReason::NotListed)
        }
    }

    /// [`AcceptPolicy::judge`] where an answer to [`OfferVerdict::Ask`] is known:
    /// `answer` is `None` where nobody can be asked.
    pub fn judge_answered(&self, peer: Option<&PeerInfo>, answer: Option<bool>) -> OfferVerdict {
        match (self.judge(peer), answer) {
            (OfferVerdict::Ask, None) => OfferVerdict::Decline(DeclineReason::NobodyToAsk),
            (OfferVerdict::Ask, Some(true)) => OfferVerdict::Accept,
            (OfferVerdict::Ask, Some(false)) => OfferVerdict::Decline(DeclineReason::Refused),
            (verdict, _) => verdict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKeyPair;
    use crate::node::PeerState;
    use crate::signal::PeerId;

    fn peer(name: &str, trust: Trust, seed: u8) -> PeerInfo {
        let key = IdentityKeyPair::from_secret_bytes(&[seed; 32]);
        PeerInfo {
            name: Some(name.into()),
            fingerprint: Some(key.public().fingerprint()),
            trust: Some(trust),
            ..PeerInfo::new(PeerId::new(format!("p{seed}")).unwrap(), PeerState::Direct)
        }
    }

    #[test]
    fn without_a_rule_every_offer_is_a_question_and_nobody_to_ask_declines() {
        let policy = AcceptPolicy::from_words::<&str>(&[]).unwrap();
        assert!(!policy.has_rule());
        let ada = peer("ada", Trust::Verified, 1);
        assert_eq!(policy.judge(Some(&ada)), OfferVerdict::Ask);
        assert_eq!(
            policy.judge_answered(Some(&ada), None),
            OfferVerdict::Decline(DeclineReason::NobodyToAsk)
        );
        assert_eq!(policy.judge_answered(Some(&ada), Some(true)), OfferVerdict::Accept);
        assert_eq!(
            policy.judge_answered(Some(&ada), Some(false)),
            OfferVerdict::Decline(DeclineReason::Refused)
        );
    }

    #[test]
    fn a_changed_key_is_taken_only_when_named_by_its_key() {
        let mallory_as_ada = peer("ada", Trust::Changed { verified_before: true }, 2);
        for words in [&["any"][..], &["ada"], &["any", "ada"]] {
            let policy = AcceptPolicy::from_words(words).unwrap();
            assert_eq!(
                policy.judge(Some(&mallory_as_ada)),
                OfferVerdict::Decline(DeclineReason::KeyChanged),
                "{words:?}"
            );
        }
        // Nobody to ask and no answer: still declined for the key, not asked about.
        assert_eq!(
            AcceptPolicy::ask().judge_answered(Some(&mallory_as_ada), Some(true)),
            OfferVerdict::Decline(DeclineReason::KeyChanged)
        );
        let fp = mallory_as_ada.fingerprint.unwrap().to_hex();
        let by_key = AcceptPolicy::from_words(&[&fp[..16]]).unwrap();
        assert_eq!(by_key.judge(Some(&mallory_as_ada)), OfferVerdict::Accept);
    }

    #[test]
    fn named_peers_only_and_unauthenticated_never() {
        let policy = AcceptPolicy::from_words(&["ada"]).unwrap();
        assert_eq!(policy.judge(Some(&peer("ada", Trust::Known, 1))), OfferVerdict::Accept);
        assert_eq!(
            policy.judge(Some(&peer("bea", Trust::Verified, 3))),
            OfferVerdict::Decline(DeclineReason::NotListed)
        );
        let mut nameless = peer("ada", Trust::Known, 1);
        nameless.fingerprint = None;
        for p in [None, Some(&nameless)] {
            assert_eq!(
                AcceptPolicy::from_words(&["any"]).unwrap().judge(p),
                OfferVerdict::Decline(DeclineReason::Unauthenticated)
            );
        }
        assert!(AcceptPolicy::from_words(&["  "]).is_err());
    }
}
