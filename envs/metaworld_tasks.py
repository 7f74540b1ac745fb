"""Language for the 50 MetaWorld v3 tasks: instructions and subtask labels.

Pure data (no MetaWorld import), so listing tasks and registering Gymnasium ids stays cheap.

Each task has

* ``train`` — paraphrases sampled for collection and training (``instruction_split="train"``),
* ``eval`` — held-out paraphrases never used for training (``instruction_split="eval"``), to
  measure whether a policy follows language rather than memorized strings,
* ``labels`` — the subtask labels the scripted expert emits, in order, and ``kind``, which says
  how :class:`vla.envs.metaworld.SubtaskLabeler` moves from one label to the next:

  - ``"grasp"`` (3 labels: reach, grasp, move): the expert's gripper command rises when it
    closes on the object, and the object then leaves its start position;
  - ``"contact"`` (2 labels: reach, act): the expert pushes/presses/turns without grasping; the
    second label starts when the object starts to move (or the hand gets within ``near`` of it,
    for objects that barely move such as the coffee machine's button; ``move=False`` for objects
    that drift on their own, such as door-close's swinging door, whose switch is task-specific);
  - ``"reach"`` (2 labels): no object; the second label starts halfway to the goal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetaWorldTaskText:
    """Instructions and subtask labels of one MetaWorld task (see the module docstring)."""

    train: tuple[str, ...]
    eval: tuple[str, ...]
    labels: tuple[str, ...]
    kind: str  # "grasp" | "contact" | "reach"
    near: float | None = None  # contact tasks: hand-object distance that also starts the 2nd label
    move: bool = True  # contact tasks: object motion starts the 2nd label (False: it drifts on its own)

    def __post_init__(self) -> None:
        n = {"grasp": 3, "contact": 2, "reach": 2}.get(self.kind)
        if n is None:
            raise ValueError(f"kind must be grasp|contact|reach, got {self.kind!r}")
        if len(self.labels) != n:
            raise ValueError(f"a {self.kind!r} task needs {n} labels, got {len(self.labels)}: {self.labels}")
        if len(self.train) < 3 or len(self.eval) < 1 or set(self.train) & set(self.eval):
            raise ValueError(f"need >=3 train and >=1 disjoint eval instructions, got {self.train} / {self.eval}")


def _t(
    train: list[str], eval: list[str], labels: list[str], kind: str, near: float | None = None, move: bool = True
) -> MetaWorldTaskText:
    return MetaWorldTaskText(tuple(train), tuple(eval), tuple(labels), kind, near, move)


TASK_TEXT: dict[str, MetaWorldTaskText] = {
    "assembly-v3": _t(
        ["put the ring onto the peg", "assemble the ring on the peg", "pick up the nut and slide it over the peg",
         "place the round nut on the peg"],
        ["fit the ring around the peg"],
        ["reach the ring handle", "grasp the ring", "slide the ring onto the peg"], "grasp"),
    "basketball-v3": _t(
        ["dunk the ball into the hoop", "put the basketball in the hoop", "pick up the ball and drop it in the basket",
         "score a basket with the ball"],
        ["place the ball through the hoop"],
        ["reach the ball", "grasp the ball", "carry the ball into the hoop"], "grasp"),
    "bin-picking-v3": _t(
        ["move the cube from one bin to the other", "pick the block out of the left bin and put it in the right bin",
         "transfer the cube to the other bin", "take the cube and drop it in the target bin"],
        ["relocate the block into the second bin"],
        ["reach the cube", "grasp the cube", "carry the cube to the other bin"], "grasp"),
    "box-close-v3": _t(
        ["put the lid on the box", "close the box with its lid", "pick up the lid and place it on the box",
         "cover the box"],
        ["shut the box by placing the lid on top"],
        ["reach the lid handle", "grasp the lid", "place the lid on the box"], "grasp"),
    "button-press-topdown-v3": _t(
        ["press the button from the top", "push the button down", "press down on the button",
         "push the button from above"],
        ["hit the button top-down"],
        ["move above the button", "press the button down"], "contact"),
    "button-press-topdown-wall-v3": _t(
        ["press the button from the top behind the wall", "push the button down past the wall",
         "press down on the button beside the wall", "reach over the wall and push the button down"],
        ["hit the button top-down despite the wall"],
        ["move above the button", "press the button down"], "contact"),
    "button-press-v3": _t(
        ["press the button", "push the button in", "press the button on the box from the front",
         "push the red button"],
        ["poke the button until it clicks"],
        ["line up with the button", "push the button in"], "contact"),
    "button-press-wall-v3": _t(
        ["press the button behind the wall", "reach past the wall and push the button",
         "push the button in behind the wall", "press the button on the other side of the wall"],
        ["get around the wall and press the button"],
        ["reach around the wall to the button", "push the button in"], "contact"),
    "coffee-button-v3": _t(
        ["press the button on the coffee machine", "push the coffee machine's button",
         "start the coffee machine", "press the coffee maker button"],
        ["turn on the coffee machine with its button"],
        ["line up with the coffee machine button", "press the coffee button"], "contact", near=0.095),
    "coffee-pull-v3": _t(
        ["pull the mug out from under the coffee machine", "take the cup away from the coffee machine",
         "grab the mug and pull it back", "move the mug out of the coffee machine"],
        ["slide the coffee cup away from the machine"],
        ["reach the mug", "grasp the mug", "pull the mug to the target"], "grasp"),
    "coffee-push-v3": _t(
        ["push the mug under the coffee machine", "put the cup under the coffee machine",
         "slide the mug into the coffee machine", "move the mug below the coffee spout"],
        ["place the coffee cup under the machine"],
        ["reach the mug", "grasp the mug", "push the mug under the coffee machine"], "grasp"),
    "dial-turn-v3": _t(
        ["turn the dial", "rotate the dial", "spin the knob around", "turn the knob"],
        ["twist the dial"],
        ["move to the dial", "turn the dial"], "contact"),
    "disassemble-v3": _t(
        ["take the ring off the peg", "remove the nut from the peg", "pick the ring up and off the peg",
         "disassemble the ring from the peg"],
        ["lift the round nut off its peg"],
        ["reach the ring handle", "grasp the ring", "lift the ring off the peg"], "grasp"),
    "door-close-v3": _t(
        ["close the door", "shut the door", "push the door closed", "swing the door shut"],
        ["push the open door until it is closed"],
        ["reach round the door", "push the door closed"], "contact", move=False),
    "door-lock-v3": _t(
        ["lock the door", "turn the lock on the door", "lock the door by turning the knob down",
         "rotate the door lock to locked"],
        ["secure the door with its lock"],
        ["reach the door lock", "turn the lock down"], "contact"),
    "door-open-v3": _t(
        ["open the door", "pull the door open", "swing the door open", "open the door by its handle"],
        ["get the door open"],
        ["reach the door handle", "pull the door open"], "contact"),
    "door-unlock-v3": _t(
        ["unlock the door", "turn the lock to unlock the door", "rotate the door lock to unlocked",
         "unlock the door by turning the knob"],
        ["release the door lock"],
        ["reach the door lock", "turn the lock up"], "contact"),
    "hand-insert-v3": _t(
        ["put the block into the hole", "insert the cube into the hole in the table",
         "pick up the block and drop it in the hole", "place the cube in the opening"],
        ["sink the block into the hole"],
        ["reach the block", "grasp the block", "move the block into the hole"], "grasp"),
    "drawer-close-v3": _t(
        ["close the drawer", "push the drawer shut", "slide the drawer closed", "push the drawer in"],
        ["shut the open drawer"],
        ["reach the drawer front", "push the drawer closed"], "contact"),
    "drawer-open-v3": _t(
        ["open the drawer", "pull the drawer open", "slide the drawer out", "pull out the drawer"],
        ["draw the drawer open by its handle"],
        ["reach the drawer handle", "pull the drawer open"], "contact"),
    "faucet-open-v3": _t(
        ["turn the faucet on", "open the faucet", "rotate the faucet handle to open it", "turn on the tap"],
        ["swing the tap handle to the open side"],
        ["reach the faucet handle", "turn the faucet open"], "contact"),
    "faucet-close-v3": _t(
        ["turn the faucet off", "close the faucet", "rotate the faucet handle to close it", "turn off the tap"],
        ["swing the tap handle to the closed side"],
        ["reach the faucet handle", "turn the faucet closed"], "contact"),
    "hammer-v3": _t(
        ["hammer the nail in", "pick up the hammer and drive in the nail", "use the hammer to hit the nail",
         "knock the nail into the wall with the hammer"],
        ["drive the peg home with the hammer"],
        ["reach the hammer", "grasp the hammer", "hit the nail with the hammer"], "grasp"),
    "handle-press-side-v3": _t(
        ["press the handle down from the side", "push the side handle down", "press down the handle on the side",
         "push the lever handle down sideways"],
        ["lower the handle from the side"],
        ["move above the handle", "press the handle down"], "contact"),
    "handle-press-v3": _t(
        ["press the handle down", "push the handle down", "press down on the handle", "push the lever handle down"],
        ["lower the handle all the way"],
        ["move above the handle", "press the handle down"], "contact"),
    "handle-pull-side-v3": _t(
        ["pull the handle up from the side", "lift the side handle", "pull up the handle on the side",
         "raise the handle sideways"],
        ["bring the handle up from the side"],
        ["reach under the handle", "grip the handle", "pull the handle up"], "grasp"),
    "handle-pull-v3": _t(
        ["pull the handle up", "lift the handle", "pull up on the handle", "raise the lever handle"],
        ["bring the handle all the way up"],
        ["reach under the handle", "pull the handle up"], "contact"),
    "lever-pull-v3": _t(
        ["pull the lever up", "lift the lever", "raise the lever", "rotate the lever upward"],
        ["swing the lever up"],
        ["reach the lever", "pull the lever up"], "contact"),
    "pick-place-wall-v3": _t(
        ["pick up the puck and place it behind the wall", "move the puck over the wall to the goal",
         "lift the puck over the wall and put it at the target", "place the puck on the other side of the wall"],
        ["carry the puck past the wall to the goal"],
        ["reach the puck", "grasp the puck", "carry the puck over the wall to the goal"], "grasp"),
    "pick-out-of-hole-v3": _t(
        ["pick the ball out of the hole", "take the puck out of the hole", "lift the object out of the hole",
         "grab the ball from the hole and raise it"],
        ["retrieve the object from the hole"],
        ["reach into the hole", "grasp the object", "lift the object out to the goal"], "grasp"),
    "pick-place-v3": _t(
        ["pick up the puck and place it at the goal", "move the puck to the target", "pick and place the puck",
         "put the puck at the goal position"],
        ["carry the puck to the target spot"],
        ["reach the puck", "grasp the puck", "carry the puck to the goal"], "grasp"),
    "plate-slide-v3": _t(
        ["slide the plate into the cabinet", "push the plate into the goal", "slide the plate forward into the net",
         "push the plate to the target"],
        ["shove the plate into the cabinet"],
        ["reach behind the plate", "slide the plate into the cabinet"], "contact"),
    "plate-slide-side-v3": _t(
        ["slide the plate sideways into the cabinet", "push the plate to the side into the goal",
         "slide the plate into the cabinet from the side", "push the plate sideways to the target"],
        ["shove the plate sideways into the cabinet"],
        ["reach beside the plate", "slide the plate sideways into the cabinet"], "contact"),
    "plate-slide-back-v3": _t(
        ["slide the plate back out of the cabinet", "pull the plate out of the goal",
         "slide the plate back toward you", "get the plate out of the cabinet"],
        ["drag the plate back out of the cabinet"],
        ["reach the plate", "slide the plate back out"], "contact"),
    "plate-slide-back-side-v3": _t(
        ["slide the plate out of the cabinet sideways", "pull the plate out of the goal to the side",
         "slide the plate back out from the side", "take the plate out of the cabinet sideways"],
        ["drag the plate sideways out of the cabinet"],
        ["reach the plate", "slide the plate sideways out"], "contact"),
    "peg-insert-side-v3": _t(
        ["insert the peg into the hole from the side", "put the peg in the hole", "pick up the peg and insert it",
         "slide the peg into the box's hole"],
        ["plug the peg into the side hole"],
        ["reach the peg", "grasp the peg", "insert the peg into the hole"], "grasp"),
    "peg-unplug-side-v3": _t(
        ["unplug the peg from the side", "pull the peg out of the hole", "remove the peg from the box",
         "take the peg out sideways"],
        ["extract the plugged peg"],
        ["reach the peg", "grasp the peg", "pull the peg out"], "grasp"),
    "soccer-v3": _t(
        ["kick the ball into the goal", "push the soccer ball into the net", "score a goal with the ball",
         "roll the ball into the goal"],
        ["get the ball into the net"],
        ["reach behind the ball", "push the ball into the goal"], "contact"),
    "stick-push-v3": _t(
        ["use the stick to push the thermos to the goal", "grab the stick and push the bottle",
         "push the thermos with the stick", "pick up the stick and shove the thermos to the target"],
        ["move the thermos to the goal using the stick as a tool"],
        ["reach the stick", "grasp the stick", "push the thermos with the stick"], "grasp"),
    "stick-pull-v3": _t(
        ["use the stick to pull the thermos to the goal", "grab the stick and pull the bottle",
         "pull the thermos with the stick", "pick up the stick and drag the thermos to the target"],
        ["bring the thermos to the goal using the stick as a tool"],
        ["reach the stick", "grasp the stick", "pull the thermos with the stick"], "grasp"),
    "push-v3": _t(
        ["push the puck to the goal", "slide the puck to the target", "push the puck across the table to the goal",
         "move the puck to the target by pushing"],
        ["nudge the puck onto the goal"],
        ["reach the puck", "grip the puck", "push the puck to the goal"], "grasp"),
    "push-wall-v3": _t(
        ["push the puck around the wall to the goal", "slide the puck past the wall to the target",
         "push the puck to the goal behind the wall", "move the puck around the wall"],
        ["steer the puck around the wall onto the goal"],
        ["reach the puck", "grip the puck", "push the puck around the wall"], "grasp"),
    "push-back-v3": _t(
        ["push the puck back to the goal", "slide the puck backward to the target", "pull the puck back to the goal",
         "move the puck back toward you"],
        ["draw the puck back onto the goal"],
        ["reach the puck", "grip the puck", "slide the puck back to the goal"], "grasp"),
    "reach-v3": _t(
        ["reach the goal", "move the gripper to the target", "touch the goal position", "reach for the target"],
        ["put the hand on the goal point"],
        ["move toward the goal", "reach the goal"], "reach"),
    "reach-wall-v3": _t(
        ["reach the goal behind the wall", "move the gripper over the wall to the target",
         "reach past the wall to the goal", "touch the target on the other side of the wall"],
        ["put the hand on the goal beyond the wall"],
        ["move over the wall toward the goal", "reach the goal"], "reach"),
    "shelf-place-v3": _t(
        ["put the block on the shelf", "place the cube on the shelf", "pick up the block and set it on the shelf",
         "move the block onto the shelf"],
        ["stack the block onto the shelf"],
        ["reach the block", "grasp the block", "place the block on the shelf"], "grasp"),
    "sweep-into-v3": _t(
        ["sweep the puck into the hole", "push the puck into the hole", "slide the puck into the opening",
         "sweep the block into the hole"],
        ["brush the puck into the hole"],
        ["reach the puck", "grip the puck", "sweep the puck into the hole"], "grasp"),
    "sweep-v3": _t(
        ["sweep the puck off the table", "push the puck off the edge", "sweep the block off the table",
         "slide the puck off the side of the table"],
        ["brush the puck over the edge"],
        ["reach the puck", "grip the puck", "sweep the puck off the table"], "grasp"),
    "window-open-v3": _t(
        ["open the window", "slide the window open", "push the window open sideways", "slide the window to open it"],
        ["get the window open"],
        ["reach the window handle", "slide the window open"], "contact"),
    "window-close-v3": _t(
        ["close the window", "slide the window shut", "push the window closed", "slide the window to close it"],
        ["get the window shut"],
        ["reach the window handle", "slide the window closed"], "contact"),
}

TASK_NAMES: list[str] = sorted(TASK_TEXT)
