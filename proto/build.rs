fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox is a pure-Rust .proto compiler: the build needs no system protoc.
    let files = [
        "proto/control.proto",
        "proto/raft.proto",
        "proto/dispatcher.proto",
        "proto/join.proto",
        "proto/agent.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
