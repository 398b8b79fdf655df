//! Measurement routines shared by the native and the WebAssembly benchmarks, so both run
//! the very same code. The caller passes its clock in; the core still reads none.

use std::time::Duration;

use hpke::rand_core::CryptoRng;

use crate::aead::PacketAead;
use crate::handshake::{ChannelBinding, HandshakeInitiator, HandshakeResponder};
use crate::identity::IdentityKeyPair;
use crate::network::NetworkSecret;
use crate::transport::{Channel, MAX_PLAINTEXT_LEN, PACKET_OVERHEAD, Session};

/// Result of [`transport_throughput`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Payload bytes sealed and opened.
    pub bytes: u64,
    /// Wall time for sealing and opening them, by the caller's clock.
    pub elapsed: Duration,
}

impl Throughput {
    /// Megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 { self.bytes as f64 / secs / 1e6 } else { 0.0 }
    }

    /// Gigabytes (10^9 bytes) per second.
    pub fn gb_per_s(&self) -> f64 {
        self.mb_per_s() / 1e3
    }
}

/// Why a measurement could not run.
#[derive(Debug, thiserror::Error)]
#[error("benchmark setup failed: {0}")]
pub struct PerfError(String);

fn session_pair(rng: &mut impl CryptoRng) -> Result<(Session, Session), PerfError> {
    let err = |e: &dyn std::fmt::Display| PerfError(e.to_string());
    let secret = NetworkSecret::generate(rng);
    let a = IdentityKeyPair::generate(rng);
    let b = IdentityKeyPair::generate(rng);
    let ba = ChannelBinding::new("sha-256 aa", "sha-256 bb").map_err(|e| err(&e))?;
    let bb = ChannelBinding::new("sha-256 bb", "sha-256 aa").map_err(|e| err(&e))?;
    let (mut init, m1) = HandshakeInitiator::new(rng, &a, &secret, &ba);
    let mut resp = HandshakeResponder::new(&b, &secret, &bb);
    let m2 = resp.handle(&m1, rng).map_err(|e| err(&e))?.message;
    let step = init.handle(&m2.unwrap_or_default(), rng).map_err(|e| err(&e))?;
    let m3 = step.message.unwrap_or_default();
    let sa = step.established.ok_or_else(|| PerfError("initiator not established".into()))?;
    let sb = resp
        .handle(&m3, rng)
        .map_err(|e| err(&e))?
        .established
        .ok_or_else(|| PerfError("responder not established".into()))?;
    Ok((sa.session, sb.session))
}

/// Seals `total` bytes in packets of `packet_len` on one session and opens them on its
/// peer (one thread), timing only that loop with `clock`.
pub fn transport_throughput(
    rng: &mut impl CryptoRng,
    packet_len: usize,
    total: u64,
    mut clock: impl FnMut() -> Duration,
) -> Result<Throughput, PerfError> {
    let (mut tx, mut rx) = session_pair(rng)?;
    let payload = vec![0x5a_u8; packet_len.max(1)];
    let packets = total.div_ceil(payload.len() as u64);
    let start = clock();
    for _ in 0..packets {
        let now = clock();
        let packet = tx.seal(&payload, now).map_err(|e| PerfError(e.to_string()))?;
        let opened = rx.open(&packet, now).map_err(|e| PerfError(e.to_string()))?;
        if opened.len() != payload.len() {
            return Err(PerfError("opened a different length".into()));
        }
    }
    let elapsed = clock().saturating_sub(start);
    Ok(Throughput { bytes: packets * payload.len() as u64, elapsed })
}

/// Seals `total` bytes in packets of `packet_len` with a session on cipher `C` (one
/// thread), through the allocation-free [`Session::seal_into`] into one reused buffer.
/// `clock` is read only before and after the loop (every packet is sealed at the start
/// time), so the driver's clock costs nothing per packet.
///
/// `C` = [`crate::aead::PacketCipher`] measures this build's transport; the other
/// [`PacketAead`] on the same packets is the baseline.
pub fn transport_seal_throughput<C: PacketAead + 'static>(
    rng: &mut impl CryptoRng,
    packet_len: usize,
    total: u64,
    mut clock: impl FnMut() -> Duration,
) -> Result<Throughput, PerfError> {
    let (mut send_chain, mut recv_chain) = ([0u8; 32], [0u8; 32]);
    rng.fill_bytes(&mut send_chain);
    rng.fill_bytes(&mut recv_chain);
    let mut tx = Session::with_cipher::<C>(Channel::Control, &send_chain, &recv_chain, [0; 32]);
    let payload = vec![0x5a_u8; packet_len.clamp(1, MAX_PLAINTEXT_LEN)];
    let mut packet = vec![0_u8; PACKET_OVERHEAD + payload.len()];
    let packets = total.div_ceil(payload.len() as u64);
    let start = clock();
    for _ in 0..packets {
        let len =
            tx.seal_into(&payload, &mut packet, start).map_err(|e| PerfError(e.to_string()))?;
        std::hint::black_box(&packet[..len]);
    }
    let elapsed = clock().saturating_sub(start);
    Ok(Throughput { bytes: packets * payload.len() as u64, elapsed })
}

/// Moves a `total`-byte file from one transfer engine to another (one thread): chunk
/// requests, reads from memory, sealing and opening every chunk with the transport, the
/// receiver's BLAKE3 verification and (instant) writes. Hashing the file before the offer
/// is timed separately. Returns (transfer, hashing).
pub fn transfer_throughput(
    rng: &mut impl CryptoRng,
    total: u64,
    mut clock: impl FnMut() -> Duration,
) -> Result<(Throughput, Throughput), PerfError> {
    use crate::frame::Frame;
    use crate::signal::PeerId;
    use crate::transfer::{Engine, EngineConfig, FileHasher, Output, TransferEvent, TransferMsg};

    let err = |e: &dyn std::fmt::Display| PerfError(e.to_string());
    let (mut tx, mut rx) = session_pair(rng)?;
    let len = usize::try_from(total).map_err(|e| err(&e))?;
    let file: Vec<u8> =
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let start = clock();
    let mut hasher = FileHasher::new();
    hasher.update(&file);
    let digest = hasher.finish();
    let hashing = Throughput { bytes: total, elapsed: clock().saturating_sub(start) };

    let (a, b) = (
        PeerId::new("seeder").map_err(|e| err(&e))?,
        PeerId::new("receiver").map_err(|e| err(&e))?,
    );
    let mut seeder = Engine::new(EngineConfig::default(), 1);
    let mut receiver = Engine::new(EngineConfig::default(), 2);
    // Each knows the other by a tag of its key; the receiver's fetches prove the
    // seeder's capability bound to its own.
    let receiver_key = crate::transfer::Root::of(b"receiver key");
    receiver.set_identity(receiver_key);
    seeder.peer_identity(&b, receiver_key);
    seeder.share(digest.root, digest.size, digest.cvs).map_err(|e| err(&e))?;
    let start = clock();
    seeder.peer_connected(&b, start);
    receiver.peer_connected(&a, start);
    seeder.offer(&b, &[(digest.root, "bench".into())]).map_err(|e| err(&e))?;
    let mut complete = false;
    while !complete {
        let mut moved = false;
        while let Some(out) = seeder.poll_output() {
            moved = true;
            let now = clock();
            match out {
                Output::Send { msg, .. } => {
                    // The chunk goes through the transport as it would on the wire.
                    let (t, body) = msg.encode();
                    let packet = tx
                        .seal_frames(&[Frame::Unknown { frame_type: t, body }], now)
                        .map_err(|e| err(&e))?;
                    for frame in rx.open_frames(&packet, now).map_err(|e| err(&e))? {
                        if let Frame::Unknown { frame_type, body } = frame {
                            let msg =
                                TransferMsg::decode(frame_type, &body).map_err(|e| err(&e))?;
                            receiver.handle(&a, msg, now);
                        }
                    }
                }
                Output::Read { peer, root, index, offset, len } => {
                    let at = usize::try_from(offset).map_err(|e| err(&e))?;
                    let data =
                        file.get(at..at + len).ok_or_else(|| PerfError("bad read".into()))?;
                    seeder.read_done(&peer, &root, index, data.to_vec());
                }
                _ => {}
            }
        }
        while let Some(out) = receiver.poll_output() {
            moved = true;
            let now = clock();
            match out {
                Output::Send { msg, .. } => seeder.handle(&b, msg, now),
                Output::Write { root, index, .. } => receiver.write_done(&root, index, now),
                Output::Event(TransferEvent::Offered { offer_id, .. }) => {
                    receiver.accept(&a, offer_id, now).map_err(|e| err(&e))?;
                }
                Output::Event(TransferEvent::FileComplete { .. }) => complete = true,
                Output::Event(TransferEvent::ChunkRejected { .. }) => {
                    return Err(PerfError("a chunk failed verification".into()));
                }
                _ => {}
            }
        }
        if !moved && !complete {
            return Err(PerfError("the transfer stalled".into()));
        }
    }
    let transfer = Throughput { bytes: total, elapsed: clock().saturating_sub(start) };
    Ok((transfer, hashing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use chacha20::rand_core::SeedableRng;

    #[test]
    fn measures_something() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut t = Duration::ZERO;
        let r = transport_throughput(&mut rng, 1400, 14_000, || {
            t += Duration::from_micros(10);
            t
        })
        .unwrap();
        assert_eq!(r.bytes, 14_000);
        assert!(r.mb_per_s() > 0.0);
    }

    #[test]
    fn measures_sealing_on_both_ciphers() {
        use crate::aead::{PacketCipher, RustCryptoChaCha20Poly1305};
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut t = Duration::ZERO;
        let mut clock = || {
            t += Duration::from_micros(10);
            t
        };
        let ours = transport_seal_throughput::<PacketCipher>(&mut rng, 1400, 14_001, &mut clock);
        let base = transport_seal_throughput::<RustCryptoChaCha20Poly1305>(
            &mut rng, 1400, 14_001, &mut clock,
        );
        for r in [ours.unwrap(), base.unwrap()] {
            assert_eq!(r.bytes, 15_400);
            assert!(r.gb_per_s() > 0.0);
        }
    }

    #[test]
    fn a_transfer_completes() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut t = Duration::ZERO;
        let (transfer, hashing) = transfer_throughput(&mut rng, 1_000_000, || {
            t += Duration::from_micros(10);
            t
        })
        .unwrap();
        assert_eq!((transfer.bytes, hashing.bytes), (1_000_000, 1_000_000));
    }
}
