//! `understudy certs`: a private CA and node certificates for mutual TLS.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use understudy_transport::certs::{init_ca, issue, CaOptions};
use understudy_transport::Validity;

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create the private CA (ca.pem, ca.key) that signs every node of one deployment.
    Init(InitArgs),
    /// Issue a node certificate NAME.pem / NAME.key signed by the CA (serves as client and server).
    Issue(IssueArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// Directory for the CA files.
    #[arg(long, default_value = "certs")]
    dir: PathBuf,
    /// Replace an existing CA (every certificate it signed stops being accepted).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct IssueArgs {
    /// Directory holding the CA; the node files are written there too.
    #[arg(long, default_value = "certs")]
    dir: PathBuf,
    /// Node name (also its DNS name in the certificate): e.g. primary, backup, witness.
    #[arg(long)]
    name: String,
    /// Validity in days.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
}

pub fn run(cmd: CertsCommand) -> Result<i32> {
    match cmd {
        CertsCommand::Init(a) => {
            let p = init_ca(
                &a.dir,
                &CaOptions {
                    overwrite: a.force,
                    ..CaOptions::default()
                },
            )?;
            println!(
                "CA certificate: {}\nCA key:         {}",
                p.cert.display(),
                p.key.display()
            );
        }
        CertsCommand::Issue(a) => {
            let p = issue(&a.dir, &a.name, Validity::days_from_now(a.days))?;
            println!(
                "certificate: {}\nkey:         {}",
                p.cert.display(),
                p.key.display()
            );
        }
    }
    Ok(0)
}
