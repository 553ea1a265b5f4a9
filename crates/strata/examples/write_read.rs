//! Open a device from a URI, write a buffer, flush, and read it back through Strata's public API
//! — the library use the README shows.
//!
//! ```text
//! cargo run --example write_read -- 'file:///tmp/example.img?size=64M'
//! ```

use strata::bdev::{Bytes, WriteOpts};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let uri = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "mem://example?size=64M".to_string());
    let dev = strata::registry()
        .open(&uri)
        .await
        .map_err(|e| anyhow::anyhow!("open {uri}: {}", e.chain()))?;
    let geometry = dev.geometry();
    println!(
        "opened {uri}: {} bytes, block size {}",
        geometry.size, geometry.block_size
    );

    // A recognisable 4 KiB pattern at the last 4 KiB of the device.
    let offset = geometry.size - 4096;
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    dev.write_at(offset, Bytes::from(data.clone()), WriteOpts::default())
        .await?;
    dev.flush().await?;
    let back = dev.read_at(offset, 4096).await?;
    anyhow::ensure!(
        back[..] == data[..],
        "read back differs from what was written"
    );
    println!("wrote, flushed and read back 4096 bytes at offset {offset}: identical");
    Ok(())
}
