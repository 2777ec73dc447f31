//! Tasks: one container each. The orchestrator creates them, the scheduler
//! assigns them, agents report on them. Observed state only moves forward;
//! the desired state is kept apart.

use serde::{Deserialize, Serialize};
use shoal_proto::control::ServiceSpec;

/// Task states in lifecycle order. `Ord` follows the lifecycle: a task may
/// only move to a greater state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Pending,
    Assigned,
    Accepted,
    Preparing,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Orphaned,
}

impl TaskState {
    pub const ALL: [TaskState; 12] = [
        TaskState::New,
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Accepted,
        TaskState::Preparing,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Shutdown,
        TaskState::Failed,
        TaskState::Rejected,
        TaskState::Orphaned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Accepted => "accepted",
            TaskState::Preparing => "preparing",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Shutdown => "shutdown",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Orphaned => "orphaned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Complete, shutdown, failed, rejected, orphaned: the task is over.
    pub fn is_terminal(self) -> bool {
        self >= TaskState::Complete
    }

    /// Whether `self → to` is a legal step: forward only, and nothing leaves
    /// a terminal state.
    pub fn can_advance_to(self, to: TaskState) -> bool {
        !self.is_terminal() && to > self
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskObj {
    pub id: String,
    pub service_id: String,
    pub service_name: String,
    /// Replicated services: the slot 1..=replicas this task fills. Global
    /// services: 0 (the node is the slot).
    pub slot: u64,
    /// The node the task runs on: set by the scheduler (replicated) or at
    /// creation (global).
    pub node_id: Option<u64>,
    /// The spec this task runs (a copy, so a service update does not change
    /// running tasks under their feet); shared by the tasks of one service
    /// version (the store interns it).
    #[serde(with = "super::objects::prost_bytes_arc")]
    pub spec: std::sync::Arc<ServiceSpec>,
    pub spec_version: u64,
    pub desired_state: TaskState,
    pub state: TaskState,
    /// Why the task is where it is ("no node satisfies …", "started", …).
    pub message: String,
    pub error: String,
    pub exit_code: Option<i32>,
    /// How many tasks this slot had before this one (restart count).
    pub attempt: u64,
    /// Overlay addresses of the task's container.
    pub addresses: Vec<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// When the task last changed observed state.
    pub state_at_ms: u64,
    pub version: u64,
}

impl TaskObj {
    /// Whether the scheduler has to look at the task: it wants to run and
    /// has no node yet (or, for a global task, a node it was not yet
    /// admitted to).
    pub fn wants_node(&self) -> bool {
        self.state <= TaskState::Pending && self.desired_state <= TaskState::Running
    }

    /// A task holds its node's resources from assignment until it is over,
    /// also while it is being shut down.
    pub fn holds_resources(&self) -> bool {
        self.node_id.is_some() && self.state >= TaskState::Assigned && !self.state.is_terminal()
    }

    /// A new task of `svc` for `slot` (state `new`, desired `running`, the
    /// service's current spec); the store stamps id-less fields and times.
    pub fn new(svc: &super::objects::ServiceObj, slot: u64, node_id: Option<u64>, attempt: u64, message: &str) -> Self {
        TaskObj {
            id: String::new(),
            service_id: svc.id.clone(),
            service_name: svc.spec.name.clone(),
            slot,
            node_id,
            spec: std::sync::Arc::new(svc.spec.clone()),
            spec_version: svc.version,
            desired_state: TaskState::Running,
            state: TaskState::New,
            message: message.to_string(),
            error: String::new(),
            exit_code: None,
            attempt,
            addresses: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            state_at_ms: 0,
            version: 0,
        }
    }
}

/// A change to one task. `None` fields are left as they are.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TaskUpdate {
    pub id: String,
    /// Observed state; refused unless it moves forward.
    pub state: Option<TaskState>,
    /// Desired state; may only move forward too (running → shutdown).
    pub desired_state: Option<TaskState>,
    pub node_id: Option<u64>,
    pub message: Option<String>,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub addresses: Option<Vec<String>>,
}
