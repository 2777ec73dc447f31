fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Debian's protobuf-compiler provides protoc; .ci/run installs it.
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/control.proto",
            "proto/raft.proto",
            "proto/dispatcher.proto",
            "proto/join.proto",
            "proto/agent.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
