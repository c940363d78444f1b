"""A supervised actor runtime on trio: actors, mailboxes, OTP-style supervisors.

It knows nothing about what its actors do: no keys, no values.
"""

from .actor import DEFER as DEFER
from .actor import Actor as Actor
from .actor import ActorContext as ActorContext
from .actor import ActorInfo as ActorInfo
from .actor import ActorRef as ActorRef
from .actor import ActorState as ActorState
from .chaos import ChaosMonkey as ChaosMonkey
from .chaos import Kill as Kill
from .errors import ActorCrashed as ActorCrashed
from .errors import ActorError as ActorError
from .errors import ActorKilled as ActorKilled
from .errors import ActorStopped as ActorStopped
from .errors import AskTimeout as AskTimeout
from .errors import InjectedFault as InjectedFault
from .errors import MailboxFull as MailboxFull
from .errors import SupervisorGaveUp as SupervisorGaveUp
from .errors import UnknownActor as UnknownActor
from .events import EventKind as EventKind
from .events import EventLog as EventLog
from .events import LifecycleEvent as LifecycleEvent
from .reply import ReplySlot as ReplySlot
from .spec import Backoff as Backoff
from .spec import ChildSpec as ChildSpec
from .spec import Intensity as Intensity
from .spec import RestartType as RestartType
from .spec import StateHooks as StateHooks
from .spec import Strategy as Strategy
from .supervisor import Supervisor as Supervisor
from .system import ActorSystem as ActorSystem
from .system_context import open_actor_system as open_actor_system
