//! Invite links as QR codes, for a phone to scan.

use qrcode::QrCode;
use qrcode::render::svg;
use wasm_bindgen::prelude::*;

/// An SVG image of `text` as a QR code (medium error correction), for `innerHTML`.
#[wasm_bindgen(js_name = qrSvg)]
pub fn qr_svg(text: &str) -> Result<String, JsError> {
    let code = QrCode::with_error_correction_level(text, qrcode::EcLevel::M)
        .map_err(|e| JsError::new(&format!("cannot make a QR code: {e}")))?;
    Ok(code
        .render::<svg::Color<'_>>()
        .min_dimensions(200, 200)
        .quiet_zone(true)
        .dark_color(svg::Color("#000000"))
        .light_color(svg::Color("#ffffff"))
        .build())
}
