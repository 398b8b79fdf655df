//! `bench-raw` (a hidden command): the baseline of `cargo xtask bench native`. Two
//! `weft-peer` processes in one network open a plain webrtc-rs connection (built as
//! Weft's are, see [`crate::rtc::build_with`]) with one reliable, ordered, negotiated data
//! channel, which is what Weft's control channel is, signaled over their encrypted
//! session's chat messages (`WEFTRAW offer <bytes> <sdp>` / `WEFTRAW answer <sdp>`, full
//! SDP after gathering, no trickle). The sender pumps `--bytes` in [`MESSAGE`]-byte
//! messages with backpressure (`send` waits while [`SEND_BUFFER`] bytes are
//! unacknowledged); the receiver counts them and prints
//! `{"event":"raw_done","bytes":…,"seconds":…,"mb_s":…}`, timed from the first byte to the
//! last, then says `done` on the channel and the sender prints `raw_sent`. No encryption
//! beyond DTLS, no hashing, nothing written to disk: the ceiling of the transport. With
//! `--untuned` every connection of the process (the session's too) is built with
//! webrtc-rs's defaults instead ([`crate::rtc::Tuning::UNTUNED`]), the baseline of the
//! tuning.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::BytesMut;
use serde_json::json;
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceGatheringState, RTCSessionDescription,
};
use weft_core::signal::PeerId;

use crate::Joined;
use crate::mesh::{MeshEvent, MeshHandle};
use crate::rtc::{RtcConfig, build_with};
use weft_core::node::Event;

/// Bytes per message.
const MESSAGE: usize = 64 * 1024;
/// Unacknowledged bytes at most before `send` waits.
const SEND_BUFFER: usize = 8 * 1024 * 1024;
const PREFIX: &str = "WEFTRAW ";

struct Gathered(mpsc::UnboundedSender<()>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Gathered {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.0.send(());
        }
    }
}

/// What the raw channel reports.
enum Raw {
    Open,
    Bytes(usize),
    Text(String),
}

async fn connect(
    rtc: &RtcConfig,
) -> anyhow::Result<(Arc<dyn PeerConnection>, Arc<dyn DataChannel>, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let pc = build_with(rtc, Arc::new(Gathered(tx)), Some(SEND_BUFFER), None).await?;
    let init = RTCDataChannelInit { negotiated: Some(0), ..Default::default() };
    let dc = pc.create_data_channel("raw", Some(init)).await?;
    Ok((pc, dc, rx))
}

fn poll(dc: Arc<dyn DataChannel>) -> mpsc::UnboundedReceiver<Raw> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = dc.poll().await {
            let raw = match event {
                DataChannelEvent::OnOpen => Raw::Open,
                DataChannelEvent::OnMessage(m) if m.is_string => {
                    Raw::Text(String::from_utf8_lossy(&m.data).into_owned())
                }
                DataChannelEvent::OnMessage(m) => Raw::Bytes(m.data.len()),
                DataChannelEvent::OnClose => break,
                _ => continue,
            };
            if tx.send(raw).is_err() {
                break;
            }
        }
    });
    rx
}

/// The local SDP once gathering is complete (it then lists the candidates).
async fn local_sdp(
    pc: &Arc<dyn PeerConnection>,
    gathered: &mut mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(10), gathered.recv())
        .await
        .map_err(|_| anyhow!("ICE gathering did not complete"))?;
    Ok(pc.local_description().await.context("no local description")?.sdp)
}

/// The next chat message from `peer` with our prefix, or from a peer named `name`.
async fn next_raw_message(
    events: &mut mpsc::UnboundedReceiver<MeshEvent>,
    name: &str,
) -> anyhow::Result<(PeerId, String)> {
    loop {
        match events.recv().await {
            Some(MeshEvent::Node(Event::Message { peer_id, name: from, text, .. }))
                if from == name =>
            {
                if let Some(rest) = text.strip_prefix(PREFIX) {
                    return Ok((peer_id, rest.to_string()));
                }
            }
            Some(_) => {}
            None => bail!("the session stopped"),
        }
    }
}

/// `bench-raw`: send `bytes` to `peer`, or (without `bytes`) receive from it.
pub async fn run(
    joined: Joined,
    rtc: RtcConfig,
    peer: &str,
    bytes: Option<u64>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let Joined { mesh, mut events, .. } = joined;
    let result = tokio::time::timeout(timeout, async {
        match bytes {
            Some(n) => send(&mesh, &mut events, &rtc, peer, n).await,
            None => receive(&mesh, &mut events, &rtc, peer).await,
        }
    })
    .await
    .unwrap_or_else(|_| Err(anyhow!("bench-raw did not finish within {} s", timeout.as_secs())));
    mesh.shutdown().await?;
    result
}

async fn send(
    mesh: &MeshHandle,
    events: &mut mpsc::UnboundedReceiver<MeshEvent>,
    rtc: &RtcConfig,
    name: &str,
    total: u64,
) -> anyhow::Result<()> {
    let peer_id = loop {
        match events.recv().await {
            Some(MeshEvent::Node(Event::PeerConnected(info)))
                if info.name.as_deref() == Some(name) =>
            {
                break info.peer_id;
            }
            Some(_) => {}
            None => bail!("the session stopped"),
        }
    };
    let (pc, dc, mut gathered) = connect(rtc).await?;
    let mut raw = poll(dc.clone());
    let offer = pc.create_offer(None).await?;
    pc.set_local_description(offer).await?;
    let sdp = local_sdp(&pc, &mut gathered).await?;
    mesh.send_message(&peer_id, &format!("{PREFIX}offer {total} {sdp}")).await?;
    let (_, answer) = next_raw_message(events, name).await?;
    let sdp = answer.strip_prefix("answer ").context("expected an answer")?;
    pc.set_remote_description(RTCSessionDescription::answer(sdp.to_string())?).await?;
    loop {
        match raw.recv().await {
            Some(Raw::Open) => break,
            Some(_) => {}
            None => bail!("the raw channel closed before it opened"),
        }
    }
    let start = Instant::now();
    let message = vec![0x5a_u8; MESSAGE];
    let mut left = total;
    while left > 0 {
        let n = usize::try_from(left.min(MESSAGE as u64))?;
        dc.send(BytesMut::from(&message[..n])).await?;
        left -= n as u64;
    }
    loop {
        match raw.recv().await {
            Some(Raw::Text(t)) if t == "done" => break,
            Some(_) => {}
            None => bail!("the raw channel closed before the receiver had everything"),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"event": "raw_sent", "bytes": total, "seconds": seconds,
               "mb_s": total as f64 / seconds / 1e6})
    );
    let _ = dc.close().await;
    let _ = pc.close().await;
    Ok(())
}

async fn receive(
    mesh: &MeshHandle,
    events: &mut mpsc::UnboundedReceiver<MeshEvent>,
    rtc: &RtcConfig,
    name: &str,
) -> anyhow::Result<()> {
    let (peer_id, offer) = next_raw_message(events, name).await?;
    let rest = offer.strip_prefix("offer ").context("expected an offer")?;
    let (total, sdp) = rest.split_once(' ').context("a malformed offer")?;
    let total: u64 = total.parse().context("a malformed offer")?;
    let (pc, dc, mut gathered) = connect(rtc).await?;
    let mut raw = poll(dc.clone());
    pc.set_remote_description(RTCSessionDescription::offer(sdp.to_string())?).await?;
    let answer = pc.create_answer(None).await?;
    pc.set_local_description(answer).await?;
    let sdp = local_sdp(&pc, &mut gathered).await?;
    mesh.send_message(&peer_id, &format!("{PREFIX}answer {sdp}")).await?;
    let mut got = 0u64;
    let mut first = None;
    while got < total {
        match raw.recv().await {
            Some(Raw::Bytes(n)) => {
                first.get_or_insert_with(Instant::now);
                got += n as u64;
            }
            Some(_) => {}
            None => bail!("the raw channel closed after {got} of {total} bytes"),
        }
    }
    let seconds = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    dc.send_text("done").await?;
    println!(
        "{}",
        json!({"event": "raw_done", "bytes": got, "seconds": seconds,
               "mb_s": got as f64 / seconds.max(1e-9) / 1e6})
    );
    // Let "done" reach the sender before closing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while dc.outstanding_bytes().await.unwrap_or(0) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = dc.close().await;
    let _ = pc.close().await;
    Ok(())
}
