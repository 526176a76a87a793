//! The smallest embedding of the library's OpenAI-compatible server: one checkpoint, one loopback
//! port, no keys, stopped by Ctrl-C. The full command, with every flag, is `autoglm serve`
//! (`cargo run --release --bin autoglm -- serve --help`).
//!
//! ```text
//! cargo run --release --example serve -- [MODEL_DIR] [PORT]
//! curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
//!     -d '{"model": "default", "messages": [{"role": "user", "content": "Hello"}]}'
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use autoglm_core::net::BindAddr;
use autoglm_core::server::{ModelRegistry, Server, ServerConfig};
use autoglm_core::{Engine, EngineConfig};
use autoglm_examples::bundled_model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from).unwrap_or_else(bundled_model);
    let port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(8000);

    let engine = Engine::from_dir(&dir, EngineConfig::default())?;
    let models = Arc::new(ModelRegistry::new(EngineConfig::default()));
    models.add("default", engine, Some(dir))?;
    let config = ServerConfig {
        listen: vec![BindAddr::Tcp(([127, 0, 0, 1], port).into())],
        ..ServerConfig::default()
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let server = Server::bind(config, models)?;
        for addr in server.local_addrs() {
            println!("listening on {addr}");
        }
        let handle = server.handle();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            handle.shutdown();
        });
        server.run().await;
        Ok(())
    })
}
