//! `shoal`: one binary for the node daemon and the CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod client;
mod cmd;
mod daemon;
mod output;

#[derive(Parser)]
#[command(name = "shoal", version, about = "A Swarm-style container orchestrator")]
struct Cli {
    /// Manager to talk to (any manager answers; writes go to the leader).
    #[arg(long, global = true, env = "SHOAL_HOST", default_value = "127.0.0.1:7700")]
    host: String,
    /// Directory holding the client credentials (ca.pem, cert.pem, key.pem).
    #[arg(long, global = true, env = "SHOAL_CERT_DIR", default_value = "/var/lib/shoal/client")]
    cert_dir: PathBuf,
    /// Output format for listings and inspect.
    #[arg(long, global = true, value_enum, default_value_t = output::Format::Table)]
    format: output::Format,
    /// Reads: linearizable (see every committed write, or fail) or local
    /// (this manager's state, maybe behind; answers while partitioned).
    #[arg(long, global = true, value_enum, env = "SHOAL_CONSISTENCY", default_value_t = client::Consistency::Linearizable)]
    consistency: client::Consistency,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: a manager (Raft member) or a worker.
    Daemon(daemon::DaemonArgs),
    /// Cluster-wide state.
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCmd),
    /// Manage client identities (CLI certificates; admin only).
    #[command(subcommand, name = "client-cert")]
    ClientCert(cmd::client_cert::ClientCertCmd),
    /// Show or rotate a join token.
    JoinToken(cmd::cluster::JoinTokenArgs),
    /// Manage nodes.
    #[command(subcommand)]
    Node(cmd::node::NodeCmd),
    /// Manage services.
    #[command(subcommand)]
    Service(cmd::service::ServiceCmd),
    /// Manage networks.
    #[command(subcommand)]
    Network(cmd::network::NetworkCmd),
    /// Manage named volumes (local driver; data on each node that uses them).
    #[command(subcommand)]
    Volume(cmd::volume::VolumeCmd),
    /// Manage secrets (mounted at /run/secrets/NAME in tasks that use them).
    #[command(subcommand)]
    Secret(cmd::data::DataCmd),
    /// Manage configs (mounted at /NAME in tasks that use them).
    #[command(subcommand)]
    Config(cmd::data::DataCmd),
    /// Deploy and manage stacks from compose files.
    #[command(subcommand)]
    Stack(cmd::stack::StackCmd),
    /// Run a command in a task's container, on whichever node runs it.
    Exec {
        /// Task id, id prefix, or SERVICE.SLOT
        task: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Run a container on this host, without a cluster (like `docker run`).
    Run(cmd::run::RunArgs),
    /// Manage the cluster's images (with --data-dir: this host's store).
    Image {
        /// Work on the image store under this node data dir instead of the
        /// cluster's images.
        #[arg(long, global = true, env = "SHOAL_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        cmd: cmd::image::LocalImageCmd,
    },
    /// Print a shell completion script (e.g. `shoal completion bash > /etc/bash_completion.d/shoal`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    #[command(flatten)]
    Internal(cmd::run::InternalCmd),
}

fn main() -> ExitCode {
    // Two rustls crypto providers may be linked; pick ring before anything
    // touches TLS. Err only means one was installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Daemon(args) => daemon::main(args),
        // Local runtime commands: no tokio runtime, the container runtime
        // must be started from a single-threaded process.
        Command::Run(args) => cmd::run::run(args).map(exit_code),
        Command::Image { data_dir: Some(data_dir), cmd } => {
            cmd::image::image(cmd, &data_dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Internal(c) => cmd::run::internal(c).map(exit_code),
        Command::Completion { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut script);
            match std::io::stdout().write_all(&script) {
                // `shoal completion bash | head` is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
                r => r.map(|()| ExitCode::SUCCESS).map_err(anyhow::Error::from),
            }
        }
        other => {
            let ctx = client::Ctx { host: cli.host, cert_dir: cli.cert_dir, format: cli.format, consistency: cli.consistency };
            runtime().and_then(|rt| rt.block_on(dispatch(ctx, other)))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A container's exit code as the process's own (0-255).
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn dispatch(ctx: client::Ctx, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Image { data_dir: None, cmd } => cmd::images::run(&ctx, cmd).await,
        Command::Daemon(_)
        | Command::Run(_)
        | Command::Image { data_dir: Some(_), .. }
        | Command::Internal(_)
        | Command::Completion { .. } => {
            unreachable!("handled in main")
        }
        Command::Exec { task, cmd } => return cmd::service::exec(&ctx, task, cmd).await,
        Command::Cluster(c) => cmd::cluster::run(&ctx, c).await,
        Command::ClientCert(c) => cmd::client_cert::run(&ctx, c).await,
        Command::JoinToken(a) => cmd::cluster::join_token(&ctx, a).await,
        Command::Node(c) => cmd::node::run(&ctx, c).await,
        Command::Service(c) => cmd::service::run(&ctx, c).await,
        Command::Network(c) => cmd::network::run(&ctx, c).await,
        Command::Volume(c) => cmd::volume::run(&ctx, c).await,
        Command::Secret(c) => cmd::data::run(&ctx, "secret", c).await,
        Command::Config(c) => cmd::data::run(&ctx, "config", c).await,
        Command::Stack(c) => cmd::stack::run(&ctx, c).await,
    }?;
    Ok(ExitCode::SUCCESS)
}
