"""SAM-Med3D in 3D Slicer: click on a volume, get a 3D segment, refine it live.

The Widget does the panel; the Logic converts MRML nodes to engine inputs exactly once (volume node ->
`Volume`, world points -> volume-local RAS through the volume's parent transform) and writes results
back into one segment, box by box, with undo. Everything else (the network, resampling, regions,
sessions, downloads) is `SAMMed3DLib`, which is imported only when it is first needed so that the
module loads before PyTorch is installed.
"""

from __future__ import annotations

import concurrent.futures
import enum
import importlib.util
import logging
import pathlib
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import qt
import slicer
import vtk
import vtk.util.numpy_support
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = pathlib.Path(__file__).resolve().parent
REPOSITORY_ROOT = MODULE_DIR.parent
ENGINE_PACKAGE = "SAMMed3DLib"
# SAMMed3DLib.torch_version.MINIMUM_TORCH_VERSION, which cannot be imported before torch is installed.
MINIMUM_TORCH_VERSION = "2.6"
REGION_BOX_ATTRIBUTE = "SAMMed3D.RegionBox"
POSITIVE_COLOR = (0.18, 0.80, 0.30)
NEGATIVE_COLOR = (0.90, 0.20, 0.20)
REGION_BOX_COLOR = (1.0, 0.85, 0.2)
PREVIEW_DELAY_MS = 150
POLL_INTERVAL_MS = 30
# Slicer's main thread holds Python's GIL while it sits in the Qt event loop (PythonQt is built without thread
# support), so the worker thread runs only while the main thread runs Python: each poll waits this long for the
# pending job, giving the worker the GIL (without it a click's inference took tens of times longer).
WORKER_TURN_S = 0.02
WAIT_CURSOR_AFTER_S = 0.3


def _makeEngineImportable() -> None:
    """Running from source (module path = the SAMMed3D/ folder): put the repository root on sys.path."""
    if importlib.util.find_spec(ENGINE_PACKAGE) is None and (REPOSITORY_ROOT / ENGINE_PACKAGE).is_dir():
        sys.path.insert(0, str(REPOSITORY_ROOT))


_makeEngineImportable()


def resourcePath(relativePath: str) -> str:
    """A file in Resources/: next to the module when installed, at the repository root from source."""
    installed = MODULE_DIR / "Resources" / relativePath
    if installed.exists():
        return str(installed)
    return str(REPOSITORY_ROOT / "Resources" / relativePath)


class MissingDependencyError(RuntimeError):
    """PyTorch is missing and cannot be installed from here; the message says what to do."""


#
# Choices stored in the parameter node
#


class ModelChoice(enum.Enum):
    TURBO = "turbo"
    LOCAL_FILE = "file"
    DEMO = "demo"

    def label(self) -> str:
        return {
            ModelChoice.TURBO: _("SAM-Med3D-turbo (downloaded once)"),
            ModelChoice.LOCAL_FILE: _("Local checkpoint file"),
            ModelChoice.DEMO: _("Built-in demo model (for trying only)"),
        }[self]


class DeviceChoice(enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return {
            DeviceChoice.AUTO: _("Auto (GPU if available)"),
            DeviceChoice.CUDA: _("CUDA GPU"),
            DeviceChoice.CPU: _("CPU (slow)"),
        }[self]


class PromptMode(enum.Enum):
    NEWEST = "newest"
    ACCUMULATE = "accumulate"

    def label(self) -> str:
        return {PromptMode.NEWEST: _("Newest click (official)"), PromptMode.ACCUMULATE: _("All clicks")}[self]


#
# SAMMed3D
#


class SAMMed3D(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAM-Med3D")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["SAMMed3D contributors"]
        self.parent.helpText = _("""
Promptable 3D segmentation with SAM-Med3D, run locally. Choose a volume, place green include points on
the structure and red exclude points where the mask leaks; the segment follows the points as they are
added, moved or deleted. Ctrl+Z / Ctrl+Y undo and redo prompts and mask together; I / E place include /
exclude points; N starts a new segment. From the Python console:
<code>slicer.util.getModuleLogic("SAMMed3D").segment(volumeNode, [pointRAS])</code>.
""")
        self.parent.acknowledgementText = _("""
SAM-Med3D and SAM-Med3D-turbo are by the SAM-Med3D authors (uni-medical/SAM-Med3D). This extension
re-implements their inference pipeline for 3D Slicer.
""")
        self.parent.icon = qt.QIcon(resourcePath("Icons/SAMMed3D.png"))


#
# SAMMed3DParameterNode
#


@parameterNodeWrapper
class SAMMed3DParameterNode:
    """Everything the panel shows, saved with the scene.

    inputVolume - the image to segment.
    segmentation - where segments are written.
    currentSegmentId - the segment the prompts edit.
    positivePoints, negativePoints - the include and exclude prompts.
    model, checkpointPath - which network (a local file for ModelChoice.LOCAL_FILE).
    device, promptMode - how it runs.
    showRegionBox - show the 128^3 regions the model worked in.
    overwriteOtherSegments - let a mask remove its voxels from other segments.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    currentSegmentId: str = ""
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    model: ModelChoice = ModelChoice.TURBO
    checkpointPath: pathlib.Path
    device: DeviceChoice = DeviceChoice.AUTO
    promptMode: PromptMode = PromptMode.NEWEST
    showRegionBox: bool = True
    overwriteOtherSegments: bool = False


#
# SAMMed3DWidget
#


class NoModelLoadedError(RuntimeError):
    """Raised on the worker thread, which must not call Qt (translation included): the panel words it."""

    def __init__(self) -> None:
        super().__init__("No model is loaded: choose a model under Model and try again.")


@dataclass
class _Job:
    """A future the panel waits for, and what to do with it on the main thread."""

    future: Any
    onDone: Callable[[Any], None]
    label: str
    blocking: bool = False
    started: float = field(default_factory=time.monotonic)


class SAMMed3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: prompts in, segment out. No model code here; see SAMMed3DLogic."""

    def __init__(self, parent=None) -> None:
        # State first: made without a parent (from the Python console), the base class runs setup() at once.
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SAMMed3DLogic] = None
        self._parameterNode: Optional[SAMMed3DParameterNode] = None
        self._parameterNodeGuiTag = None
        self._jobs: deque[_Job] = deque()
        self._generation = 0  # bumped when a segment is finished: results of older requests are dropped
        self._writeFailedGeneration: Optional[int] = None  # the generation whose write failed last
        self._shortcuts: list = []
        self._placementOrder: list[tuple[bool, str]] = []
        self._appliedPrompts: tuple = ()
        self._appliedFinal = True
        self._submitted: Optional[tuple[tuple, bool]] = None
        # (points, model settings) of the last request that failed or was declined: not sent again until one
        # of them changes (placing moves a hidden preview point with the mouse, which would ask every time).
        self._failedRequest: Optional[tuple] = None
        self._shownInputs: Optional[tuple] = None
        self._loadedDevice: Optional[tuple] = None  # (device choice, the torch device it gave)
        self._restoringPrompts = False
        self._observedPromptNodes: list = []
        self._blockedPlaceWidget = None
        self._waitCursorShown = False
        self._downloadDialog = None
        self._downloadState: dict = {}
        self._downloadCancel = threading.Event()
        self._pollTimer = None
        self._previewTimer = None
        self._updateTimer = None
        ScriptedLoadableModuleWidget.__init__(self, parent)

    # Setup and life cycle ---------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/SAMMed3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMMed3DLogic()

        for placeWidget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            placeWidget.setMRMLScene(slicer.mrmlScene)
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
            placeWidget.buttonsVisible = False
            placeWidget.deleteAllControlPointsOptionVisible = False
        self.ui.segmentsTableView.setMRMLScene(slicer.mrmlScene)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPoll)
        self._previewTimer = qt.QTimer()
        self._previewTimer.setSingleShot(True)
        self._previewTimer.setInterval(PREVIEW_DELAY_MS)
        self._previewTimer.connect("timeout()", lambda: self._requestUpdate(preview=True))
        # Final updates also leave the VTK event callback first: they may open dialogs (install, download).
        self._updateTimer = qt.QTimer()
        self._updateTimer.setSingleShot(True)
        self._updateTimer.setInterval(0)
        self._updateTimer.connect("timeout()", lambda: self._requestUpdate(preview=False))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentsTableView.connect(
            "selectionChanged(QItemSelection,QItemSelection)", self.onSegmentSelectionChanged
        )
        for button, placeWidget in (
            (self.ui.placePositiveButton, self.ui.positivePlaceWidget),
            (self.ui.placeNegativeButton, self.ui.negativePlaceWidget),
        ):
            button.connect(
                "clicked(bool)", lambda checked, b=button, w=placeWidget: self._onPlaceButtonClicked(b, w, checked)
            )
            placeWidget.connect("activeMarkupsPlaceModeChanged(bool)", button.setChecked)
        self.ui.newSegmentButton.connect("clicked()", self.onNewSegment)
        self.ui.undoButton.connect("clicked()", self.onUndo)
        self.ui.redoButton.connect("clicked()", self.onRedo)
        self.ui.clearPromptsButton.connect("clicked()", self.onClearPrompts)
        self.ui.acceptButton.connect("clicked()", self.onAccept)
        self.ui.downloadButton.connect("clicked()", self.onDownloadModel)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._removeShortcuts()
        self._downloadCancel.set()  # a reloaded module could neither see nor cancel this download
        self._closeDownloadDialog()
        if self._blockedPlaceWidget is not None:
            for promptNode in self._observedPromptNodes:
                promptNode.SetLocked(False)  # locked while a first region was computed; nobody would unlock them
        self.removeObservers()
        for timer in (self._pollTimer, self._previewTimer, self._updateTimer):
            if timer is not None:
                timer.stop()
        self._restoreCursor()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._installShortcuts()

    def exit(self) -> None:
        self._removeShortcuts()
        if self._blockedPlaceWidget:
            self._blockedPlaceWidget = False  # placing must not come back on in another module when the step ends
        for placeWidget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            placeWidget.setPlaceModeEnabled(False)
        # The place widgets made placing persistent on the shared interaction node: other modules place one at a time.
        slicer.app.applicationLogic().GetInteractionNode().SetPlaceModePersistence(0)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onReload(self) -> None:
        """Developer reload: also re-import the engine so that edits of SAMMed3DLib take effect."""
        for name in [name for name in sys.modules if name == ENGINE_PACKAGE or name.startswith(ENGINE_PACKAGE + ".")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self._generation += 1  # results still being computed belong to the closing scene
        self._forgetPromptState()
        self._blockedPlaceWidget = None
        self._shownInputs = None
        self.logic.endSession()
        history = self.logic.historyIfStarted()
        if history:
            history.clear()  # node ids start again in the next scene: old steps could match its segments
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # Only plain scalar volumes: labelmaps and vector volumes are subclasses but cannot be segmented.
            scalarVolumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            firstVolume = next((n for n in scalarVolumes if n.GetClassName() == "vtkMRMLScalarVolumeNode"), None)
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode: Optional[SAMMed3DParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # Parameter node -> panel ------------------------------------------------------------------

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        inputs = tuple(n.GetID() if n is not None else None for n in (node.inputVolume, node.segmentation))
        if inputs != self._shownInputs:
            previous, self._shownInputs = self._shownInputs, inputs
            if previous is not None and any(old is not None and old != new for old, new in zip(previous, inputs)):
                self._finishSegment()  # points placed for another volume or segmentation mean nothing here
                if previous[0] is not None and previous[0] != inputs[0]:
                    node.currentSegmentId = ""  # a click on another volume makes a new segment, not a replaced one
                    self.ui.segmentsTableView.setSelectedSegmentIDs([])  # picking one again selects it anew
            self.ui.segmentsTableView.setSegmentationNode(node.segmentation)
        if node.currentSegmentId and node.currentSegmentId not in self.ui.segmentsTableView.selectedSegmentIDs():
            self.ui.segmentsTableView.setSelectedSegmentIDs([node.currentSegmentId])
        for placeWidget, promptNode in (
            (self.ui.positivePlaceWidget, node.positivePoints),
            (self.ui.negativePlaceWidget, node.negativePoints),
        ):
            if placeWidget.currentNode() is not promptNode:
                placeWidget.setCurrentNode(promptNode)
        self._observePromptNodes([node.positivePoints, node.negativePoints])
        isLocalFile = node.model == ModelChoice.LOCAL_FILE
        self.ui.checkpointPathLineEdit.enabled = isLocalFile
        self.ui.checkpointPathLabel.enabled = isLocalFile
        self.ui.downloadButton.visible = node.model == ModelChoice.TURBO
        self._updateDeviceWarning()
        self.logic.showRegionBoxes(node.inputVolume, None, visible=node.showRegionBox)
        if node.inputVolume is not None and self.logic.torchAvailable():
            self._prepareVolume(node.inputVolume)
        self._updateButtons()

    def _updateButtons(self) -> None:
        key = self._currentSegmentKey()
        history = self.logic.historyIfStarted()
        self.ui.undoButton.enabled = bool(key and history and history.can_undo(key))
        self.ui.redoButton.enabled = bool(key and history and history.can_redo(key))
        hasVolume = self._parameterNode is not None and self._parameterNode.inputVolume is not None
        placing = (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget)
        for widget in (*placing, self.ui.placePositiveButton, self.ui.placeNegativeButton, self.ui.newSegmentButton):
            widget.enabled = hasVolume and self._blockedPlaceWidget is None

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    # Prompt nodes and their events ------------------------------------------------------------

    def _ensurePromptNodes(self) -> None:
        node = self._parameterNode
        if node.positivePoints is None:
            node.positivePoints = self._createPromptNode(_("SAM-Med3D include"), POSITIVE_COLOR, "+%d")
        if node.negativePoints is None:
            node.negativePoints = self._createPromptNode(_("SAM-Med3D exclude"), NEGATIVE_COLOR, "-%d")
        if node.inputVolume is None:
            return
        # Under the volume's transform, as the segmentation is: the points keep their place in the volume's frame, so
        # a registration applied to the volume moves them along.
        transformId = node.inputVolume.GetTransformNodeID()
        for promptNode in (node.positivePoints, node.negativePoints):
            if promptNode.GetTransformNodeID() != transformId:
                promptNode.SetAndObserveTransformNodeID(transformId)

    @staticmethod
    def _createPromptNode(name: str, color: tuple, labelFormat: str):
        promptNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        promptNode.CreateDefaultDisplayNodes()
        promptNode.SetControlPointLabelFormat(labelFormat)
        display = promptNode.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        display.SetActiveColor(*color)
        display.SetPointLabelsVisibility(False)
        return promptNode

    def _observePromptNodes(self, promptNodes: Sequence) -> None:
        promptNodes = [n for n in promptNodes if n is not None]
        if promptNodes == self._observedPromptNodes:
            return
        events = (
            (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPointsChanged),
            (slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._onPointReleased),
            (slicer.vtkMRMLMarkupsNode.PointRemovedEvent, self._onPointsChanged),
            (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self._onPointDragged),
        )
        for promptNode in self._observedPromptNodes:
            for event, callback in events:
                self.removeObserver(promptNode, event, callback)
        for promptNode in promptNodes:
            for event, callback in events:
                self.addObserver(promptNode, event, callback)
        self._observedPromptNodes = promptNodes
        if not self._appliedPrompts and self._parameterNode is not None:
            # Points already there (a scene saved mid-session and loaded) belong to the segment as it is: the
            # first step records them as its points before, so that undoing it keeps them.
            self._appliedPrompts = self._currentPrompts()

    def _onPointsChanged(self, caller=None, event=None) -> None:
        if self._restoringPrompts:
            return
        self._previewTimer.stop()
        self._updateTimer.start()

    def _onPointReleased(self, caller=None, event=None) -> None:
        self._failedRequest = None  # clicking a point (moved or not) asks again after a failure
        self._onPointsChanged()

    def _onPointDragged(self, caller=None, event=None) -> None:
        if self._restoringPrompts:
            return
        if not self._previewTimer.isActive():  # at most one preview per interval, of the newest positions
            self._previewTimer.start()

    def _currentPrompts(self) -> tuple:
        """((positive, world RAS), ...) of the placed points, oldest first (kept across moves)."""
        found = {}
        for positive, promptNode in (
            (True, self._parameterNode.positivePoints),
            (False, self._parameterNode.negativePoints),
        ):
            if promptNode is None:
                continue
            for index in range(promptNode.GetNumberOfControlPoints()):
                if promptNode.GetNthControlPointPositionStatus(index) != slicer.vtkMRMLMarkupsNode.PositionDefined:
                    continue
                world = [0.0, 0.0, 0.0]
                promptNode.GetNthControlPointPositionWorld(index, world)
                found[(positive, promptNode.GetNthControlPointID(index))] = tuple(world)
        kept = [key for key in self._placementOrder if key in found]
        self._placementOrder = kept + [key for key in found if key not in kept]
        return tuple((key[0], found[key]) for key in self._placementOrder)

    def _restorePrompts(self, prompts: tuple) -> None:
        """Put the points of `prompts` back on the markups without triggering a computation."""
        if prompts:
            self._ensurePromptNodes()
        positiveNode, negativeNode = self._parameterNode.positivePoints, self._parameterNode.negativePoints
        self._restoringPrompts = True
        try:
            for promptNode in (positiveNode, negativeNode):
                if promptNode is not None:
                    promptNode.RemoveAllControlPoints()
            order = []
            for positive, world in prompts:
                promptNode = positiveNode if positive else negativeNode
                index = promptNode.AddControlPointWorld(list(world))
                order.append((positive, promptNode.GetNthControlPointID(index)))
            self._placementOrder = order
        finally:
            self._restoringPrompts = False

    def _removePoints(self, promptNodes: Sequence) -> None:
        """Remove the points of the segment being finished: those of the nodes observed so far (after a scene import
        the parameter node already names the imported nodes, whose points must stay)."""
        self._restoringPrompts = True
        try:
            for promptNode in promptNodes:
                promptNode.RemoveAllControlPoints()
        finally:
            self._restoringPrompts = False

    def _forgetPromptState(self) -> None:
        self._placementOrder = []
        self._appliedPrompts = ()
        self._appliedFinal = True
        self._submitted = None
        self._failedRequest = None

    def _isDuplicate(self, prompts: tuple, preview: bool) -> bool:
        """Whether the newest submitted (else applied) state already covers this request.

        A final request after a preview of the same points still runs: it closes the drag's undo step.
        """
        if self._failedRequest == (prompts, self._modelSettings()):
            return True  # it failed or was declined: again once the points or the model change
        latest = self._submitted if self._submitted is not None else (self._appliedPrompts, self._appliedFinal)
        return latest[0] == prompts and (preview or latest[1])

    def _readyForPreview(self) -> bool:
        """The chosen model is loaded and the segment exists: a preview needs nothing set up."""
        try:
            spec = self._modelSpec()
        except Exception:  # e.g. no checkpoint file chosen: the final request says so
            return False
        ready = self.logic.modelReady() and self.logic.modelRequested(spec, self._parameterNode.device.value)
        return ready and self._currentSegmentKey() is not None

    def _modelSettings(self) -> tuple:
        node = self._parameterNode
        return node.model, str(node.checkpointPath), node.device

    # Segments ---------------------------------------------------------------------------------

    def _currentSegmentKey(self) -> Optional[tuple[str, str]]:
        node = self._parameterNode
        if node is None or node.segmentation is None or not node.currentSegmentId:
            return None
        if node.segmentation.GetSegmentation().GetSegment(node.currentSegmentId) is None:
            return None
        return SAMMed3DLogic.segmentKey(node.segmentation, node.currentSegmentId)

    def _ensureSegment(self) -> None:
        node = self._parameterNode
        if node.segmentation is None:
            node.segmentation = self.logic.ensureSegmentation(node.inputVolume)
        else:
            self.logic.ensureSegmentation(node.inputVolume, node.segmentation)
        if self._currentSegmentKey() is None:
            self.logic.endSession()  # the session's mask so far went to a segment that is gone: write all of it
            node.currentSegmentId = self.logic.addSegment(node.segmentation)
            # The new segment holds nothing of the earlier points: undoing its first step removes them all.
            self._appliedPrompts, self._appliedFinal = (), True

    def onSegmentSelectionChanged(self, selected=None, deselected=None) -> None:
        selectedIds = self.ui.segmentsTableView.selectedSegmentIDs()
        if not selectedIds or self._parameterNode is None:
            return
        if selectedIds[0] != self._parameterNode.currentSegmentId:
            self._finishSegment()
            self._parameterNode.currentSegmentId = selectedIds[0]
        self._updateButtons()

    def onNewSegment(self) -> None:
        if self._parameterNode is None or self._parameterNode.inputVolume is None:
            return
        self._finishSegment()
        with slicer.util.tryWithErrorDisplay(_("Could not add a segment."), waitCursor=True):
            node = self._parameterNode
            if node.segmentation is None:
                node.segmentation = self.logic.ensureSegmentation(node.inputVolume)
            node.currentSegmentId = self.logic.addSegment(node.segmentation)
            self.onPlacePositive()

    def onAccept(self) -> None:
        self._finishSegment(completed=True)
        self._setStatus(
            _("Segment kept. Start a new segment (N); points placed on this one again segment it anew (Ctrl+Z undoes).")
        )

    def _finishSegment(self, completed: bool = False) -> None:
        """Keep the mask, remove the points and start a fresh session for whatever comes next."""
        self._generation += 1
        key = self._currentSegmentKey()
        self._closeStep(key)
        if completed and key:
            self.logic.markSegmentCompleted(self._parameterNode.segmentation, self._parameterNode.currentSegmentId)
        self._removePoints(self._observedPromptNodes)
        self._forgetPromptState()
        self._startAfresh()
        self._updateButtons()

    def onClearPrompts(self) -> None:
        """Remove every point: the session mask goes away too (as one undoable step)."""
        if self._parameterNode is None:
            return
        if self._blockedPlaceWidget is not None:  # the points are locked while the model state is computed
            self._setStatus(_("Busy: try again when the current step has finished."))
            return
        self._restorePrompts(())
        self._requestUpdate(preview=False)

    # Placing ----------------------------------------------------------------------------------

    def onPlacePositive(self) -> None:
        self._startPlacing(self.ui.positivePlaceWidget)

    def onPlaceNegative(self) -> None:
        self._startPlacing(self.ui.negativePlaceWidget)

    def _onPlaceButtonClicked(self, button, placeWidget, checked: bool) -> None:
        if checked:
            self._startPlacing(placeWidget)
        else:
            placeWidget.setPlaceModeEnabled(False)
        button.checked = placeWidget.placeModeEnabled  # placing may have been refused (no volume, or busy)

    def _startPlacing(self, placeWidget) -> None:
        if self._parameterNode is None or self._parameterNode.inputVolume is None:
            return
        if self._blockedPlaceWidget is not None:
            return
        self._ensurePromptNodes()
        placeWidget.setPlaceModeEnabled(True)

    def _blockPrompts(self) -> None:
        """While the first region is computed: no new or moved points (they would queue up unseen)."""
        if self._blockedPlaceWidget is not None:
            return
        active = [w for w in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget) if w.placeModeEnabled]
        self._blockedPlaceWidget = active[0] if active else False
        for placeWidget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            placeWidget.setPlaceModeEnabled(False)
        for promptNode in self._observedPromptNodes:
            promptNode.SetLocked(True)
        self._updateButtons()

    def _unblockPrompts(self) -> None:
        if self._blockedPlaceWidget is None:
            return
        resume = self._blockedPlaceWidget
        self._blockedPlaceWidget = None
        for promptNode in self._observedPromptNodes:
            promptNode.SetLocked(False)
        if resume:
            resume.setPlaceModeEnabled(True)
        self._updateButtons()

    # Computing --------------------------------------------------------------------------------

    def _requestUpdate(self, preview: bool) -> None:
        """Send the current points to the worker; the newest request replaces a waiting one."""
        if self._parameterNode is None or self._restoringPrompts:
            return
        prompts = self._currentPrompts()
        if self._isDuplicate(prompts, preview):
            return
        volumeNode = self._parameterNode.inputVolume
        if volumeNode is None:
            self._setStatus(_("Choose a volume first."))
            return
        if preview and not self._readyForPreview():
            return  # a drag (or the mouse moving while placing) never asks, loads or downloads: the release does
        if not self._ensureEngineReady():
            self._requestFailed(prompts, preview)
            return
        try:
            clicks = self.logic.clicksFromPrompts(volumeNode, prompts)
        except Exception as error:
            self._requestFailed(prompts, preview, str(error))
            return
        firstOfSession = not self.logic.sessionStarted
        try:
            future = self.logic.requestSegmentation(volumeNode, clicks, self._parameterNode.promptMode.value, preview)
        except Exception as error:  # e.g. a volume the worker cannot prepare
            self._requestFailed(prompts, preview, str(error))
            return
        self._submitted = (prompts, not preview)
        key, generation = self._currentSegmentKey(), self._generation
        label = _("Computing the image embedding (first click of a region)...") if firstOfSession else _("Updating...")
        # Prompts stay blocked until a request that holds them finishes: a cancelled first request leaves that to
        # the one that replaced it.
        unblock = firstOfSession or self._blockedPlaceWidget is not None
        if firstOfSession:
            self._blockPrompts()

        def onDone(finished) -> None:
            self._onResult(finished, key, prompts, preview, unblock, generation)

        self._addJob(future, onDone, label, firstOfSession)

    def _requestFailed(self, prompts, preview: bool, message: Optional[str] = None, key=None) -> None:
        """Asked again once the points or the model change, or a point is clicked; a release ends its drag's step
        (of segment `key`, else the current one's)."""
        self._failedRequest = (prompts, self._modelSettings())
        if not preview:
            self._closeStep(self._currentSegmentKey() if key is None else key)
        if message:
            self._setStatus(message)

    def _onResult(self, future, key, prompts, preview: bool, unblock: bool, generation: int) -> None:
        if unblock and not future.cancelled():
            self._unblockPrompts()
        if future.cancelled() or generation != self._generation:
            if not preview:  # the drag this release ended is over: its previews are one undo step of their own
                self._closeStep(key)
                if not future.cancelled() and generation == self._writeFailedGeneration:
                    self._updateTimer.start()  # queued behind a failed write: asked again, as a new session
            return  # cancelled, or made for a segment, volume or scene the user has since left
        try:
            result = future.result()
        except Exception as error:
            self._requestFailed(prompts, preview, key=key)
            self._submitted = None
            self._showError(_("Segmentation failed."), error, quiet=preview or not self.logic.modelReady())
            return
        node = self._parameterNode
        segmentationNode, segmentId = self.logic.nodesOfKey(key)
        if segmentationNode is None or node.inputVolume is None:
            self._submitted = None
            self._setStatus(_("The segment or volume is gone: the next point starts a new segment."))
            return
        try:
            # No message box for a failed drag preview (it would interrupt the drag); the error is still logged.
            with slicer.util.tryWithErrorDisplay(_("Could not write the segment."), show=not preview, waitCursor=True):
                self.logic.applyResult(
                    result,
                    segmentationNode,
                    segmentId,
                    node.inputVolume,
                    overwriteOthers=node.overwriteOtherSegments,
                    promptsBefore=self._appliedPrompts,
                    promptsAfter=prompts,
                    preview=preview,
                )
        except Exception:
            # The segment now differs from the session's mask, which later results are compared with: start a
            # fresh session, whose first result rewrites the segment whole (what was written is undoable). Results
            # already queued build on the mask that was not written: they are dropped (a release among them is
            # asked again). A failed release waits for the next change or click (it could fail again and again).
            self._writeFailedGeneration = generation
            self._generation += 1
            self._closeStep(key)
            self.logic.endSession()
            self._submitted = None
            if not preview:
                self._failedRequest = (prompts, self._modelSettings())
            raise
        self._appliedPrompts, self._appliedFinal = prompts, not preview
        self._failedRequest = None
        if self._submitted == (prompts, not preview):
            self._submitted = None
        self.logic.showRegionBoxes(node.inputVolume, result.regions, visible=node.showRegionBox)
        self._setStatus(self._describeResult(result))
        self._updateButtons()

    def _describeResult(self, result) -> str:
        if not result.clicks:
            return _("No points: place an include point on the structure.")
        if not result.regions:  # exclude points alone say nothing about what to segment
            return _("Only exclude points: place an include point on the structure.")
        seconds = result.timings.get("total", float("nan"))
        text = _("Last step {seconds:.2f} s, predicted IoU {iou:.2f}, {regions} region(s).").format(
            seconds=seconds, iou=result.iou, regions=len(result.regions)
        )
        if self.logic.fellBackToCpu():
            text += " " + _("The GPU ran out of memory: now running on the CPU.")
        return text

    def _ensureEngineReady(self) -> bool:
        """PyTorch, a segment to write into, the model and the prepared volume (the last two in the worker)."""
        node = self._parameterNode
        try:
            if not self.logic.ensureTorch(askConfirmation=True):
                self._setStatus(_("PyTorch is needed: it was not installed."))
                return False
            self._ensureSegment()
            self._ensureModelLoading()
            self._prepareVolume(node.inputVolume)
        except Exception as error:
            self._showError(_("SAM-Med3D is not ready."), error)
            return False
        return True

    def _modelSpec(self):
        """What `resolve_checkpoint` takes for the panel's model choice."""
        node = self._parameterNode
        if node.model == ModelChoice.DEMO:
            return None
        if node.model == ModelChoice.TURBO:
            return "turbo"
        path = node.checkpointPath
        if not str(path) or str(path) == "." or not path.is_file():
            raise FileNotFoundError(_("Choose an existing checkpoint file (.pth) under Model, or another model."))
        return str(path)

    def _ensureModelLoading(self) -> None:
        spec, device = self._modelSpec(), self._parameterNode.device.value
        if self.logic.modelRequested(spec, device):
            return
        # A damaged cached copy is downloaded again too: asked for and shown like a first download.
        needsDownload = spec == "turbo" and self.logic.publishedCheckpointNeedsDownload("turbo")
        if needsDownload and not slicer.app.testingEnabled():
            if not slicer.util.confirmOkCancelDisplay(
                _(
                    "The SAM-Med3D-turbo weights will be downloaded into {folder} (no usable copy is there yet). "
                    "A cancelled download resumes later. Continue?"
                ).format(folder=self.logic.checkpointCacheFolder()),
                windowTitle=_("Download SAM-Med3D-turbo"),
            ):
                raise RuntimeError(
                    _("The model download was declined: choose a local checkpoint file or the demo model.")
                )
        progress = self._startDownloadDialog() if needsDownload else None
        future = self.logic.loadModel(spec, device, progress=progress)
        self._addJob(future, self._onModelLoaded, _("Loading the model..."), blocking=True)

    def _onModelLoaded(self, future) -> None:
        self._closeDownloadDialog()
        try:
            info = future.result()
        except Exception as error:
            from SAMMed3DLib.download import DownloadCancelled

            self.logic.forgetModelRequest()
            self._submitted = None
            self._showError(_("The model could not be loaded."), error, quiet=isinstance(error, DownloadCancelled))
            return
        self._failedRequest = None  # the model is there now: the same points may be sent again
        if self._parameterNode is None:  # the scene was closed while it loaded
            return
        self._loadedDevice = (self._parameterNode.device, info["device"])
        self._updateDeviceWarning()

    def _updateDeviceWarning(self) -> None:
        """A visible warning whenever the model runs (or is set to run) on the CPU."""
        choice = self._parameterNode.device
        loaded = self._loadedDevice is not None and self._loadedDevice[0] == choice
        onCpu = self._loadedDevice[1] == "cpu" if loaded else choice == DeviceChoice.CPU
        warning = ""
        if onCpu:
            warning = _(
                "Running on the CPU: each new region takes several seconds or more; moving points within a "
                "region is faster."
            )
            if loaded and choice == DeviceChoice.AUTO:
                warning += " " + _(
                    "PyTorch sees no CUDA GPU. If this computer has an NVIDIA GPU, install a CUDA "
                    "build of PyTorch in the PyTorch Utils module."
                )
        self.ui.deviceWarningLabel.text = warning

    def onDownloadModel(self) -> None:
        if self._parameterNode is None:
            return
        try:
            if not self.logic.ensureTorch(askConfirmation=True):
                return
            self.logic.forgetModelRequest()
            self._ensureModelLoading()
        except Exception as error:
            self._showError(_("The model could not be downloaded."), error)

    def _prepareVolume(self, volumeNode) -> None:
        try:
            future = self.logic.prepareVolume(volumeNode)
        except Exception as error:  # e.g. a vector volume: say so instead of breaking the panel's update
            self._setStatus(str(error))
            return
        if future is not None:
            self._addJob(future, self._onVolumePrepared, _("Preparing the volume (resampling to 1.5 mm)..."))

    def _onVolumePrepared(self, future) -> None:
        if future.cancelled():
            return
        try:
            future.result()
        except Exception as error:
            self.logic.forgetPreparedVolume()
            self._showError(_("The volume could not be prepared."), error)

    # Download progress ------------------------------------------------------------------------

    def _startDownloadDialog(self):
        self._downloadCancel.clear()
        self._downloadState = {}
        self._downloadDialog = slicer.util.createProgressDialog(
            labelText=_("Downloading SAM-Med3D-turbo..."), windowTitle=_("SAM-Med3D"), maximum=0, autoClose=False
        )
        state, cancel = self._downloadState, self._downloadCancel

        def progress(done: int, total: Optional[int]) -> Optional[bool]:
            state["done"], state["total"] = done, total  # read by the poll timer on the main thread
            return False if cancel.is_set() else None

        return progress

    def _updateDownloadDialog(self) -> None:
        dialog = self._downloadDialog
        if dialog is None:
            return
        if dialog.wasCanceled:
            self._downloadCancel.set()  # the dialog hides itself when cancelled: tell the status line instead
            self._setStatus(_("Cancelling the download (the partial file is kept for resuming)..."))
            return
        done, total = self._downloadState.get("done"), self._downloadState.get("total")
        if done is None:
            return
        if total:
            dialog.maximum = 1000
            dialog.value = int(1000 * done / total)
            dialog.labelText = _("Downloading SAM-Med3D-turbo: {done:.0f} of {total:.0f} MB").format(
                done=done / 1e6, total=total / 1e6
            )
        else:
            dialog.labelText = _("Downloading SAM-Med3D-turbo: {done:.0f} MB").format(done=done / 1e6)

    def _closeDownloadDialog(self) -> None:
        if self._downloadDialog is not None:
            self._downloadDialog.close()
            self._downloadDialog = None

    # Undo / redo ------------------------------------------------------------------------------

    def onUndo(self) -> None:
        self._undoOrRedo(undo=True)

    def onRedo(self) -> None:
        self._undoOrRedo(undo=False)

    def _undoOrRedo(self, undo: bool) -> None:
        node = self._parameterNode
        if node is None or node.inputVolume is None:
            return
        if self._currentSegmentKey() is None:
            self._setStatus(_("No current segment (deleted, or none picked): nothing to undo or redo."))
            return
        if self._jobs:
            self._setStatus(_("Busy: try again when the current step has finished."))
            return
        refusal = self.logic.undoRefusal(node.segmentation, node.currentSegmentId, node.inputVolume, undo)
        if refusal:
            self._setStatus(refusal)
            return
        with slicer.util.tryWithErrorDisplay(_("Undo/redo failed."), waitCursor=True):
            if undo:
                step = self.logic.undo(node.segmentation, node.currentSegmentId, node.inputVolume)
            else:
                step = self.logic.redo(node.segmentation, node.currentSegmentId, node.inputVolume)
            if step is None:
                self._setStatus(_("Nothing to undo.") if undo else _("Nothing to redo."))
                return
            prompts = step.prompts_before if undo else step.prompts_after
            self._restorePrompts(prompts or ())
            # Read back: under a transform the markups round the world positions a little differently.
            self._appliedPrompts, self._appliedFinal = self._currentPrompts(), True
            self._submitted = None
            self._resyncSession()
        self._updateButtons()

    def _resyncSession(self) -> None:
        """Bring the model's state to the restored points (the voxels already came from the history)."""
        if not self.logic.modelReady() or not self._appliedPrompts:
            self._startAfresh()
            self._setStatus(_("Restored."))
            return
        try:
            clicks = self.logic.clicksFromPrompts(self._parameterNode.inputVolume, self._appliedPrompts)
        except Exception as error:
            self._startAfresh()
            self._setStatus(_("Restored.") + " " + str(error))
            return
        future = self.logic.requestSegmentation(
            self._parameterNode.inputVolume, clicks, self._parameterNode.promptMode.value, coalesce=False
        )
        generation = self._generation
        self._blockPrompts()  # a point placed now would continue a session that may still have to start afresh
        self._addJob(future, lambda f: self._onResynced(f, generation), _("Restoring the model state..."))

    def _onResynced(self, future, generation: int) -> None:
        self._unblockPrompts()
        if future.cancelled() or generation != self._generation:
            return
        try:
            result = future.result()
        except Exception as error:
            self._startAfresh()
            self._showError(_("Could not restore the model state."), error, quiet=True)
            return
        node = self._parameterNode
        segmentationNode, segmentId = self.logic.nodesOfKey(self._currentSegmentKey())
        if segmentationNode is None or not self.logic.segmentEquals(
            result.mask, segmentationNode, segmentId, node.inputVolume
        ):
            # The restored voxels are not what the model now draws for these points (another model or prompt mode,
            # edits by hand): later masks compared with the model's would leave a mix of both.
            self._startAfresh()
            self._setStatus(_("Restored. The next point starts a new model session, whose mask replaces the segment."))
            return
        self.logic.showRegionBoxes(node.inputVolume, result.regions, visible=node.showRegionBox)
        self._setStatus(_("Restored.") + " " + self._describeResult(result))

    def _closeStep(self, key) -> None:
        """End the segment's open preview step, so that the next step is recorded on its own."""
        history = self.logic.historyIfStarted()
        if key and history:
            history.close(key)

    def _startAfresh(self) -> None:
        """The next point starts a new model session, whose first mask replaces the segment whole."""
        self.logic.endSession()
        self.logic.showRegionBoxes(None, [], visible=False)

    # Jobs, polling, cursor --------------------------------------------------------------------

    def _addJob(self, future, onDone: Callable, label: str, blocking: bool = False) -> None:
        self._jobs.append(_Job(future, onDone, label, blocking))
        if not self._pollTimer.isActive():
            self._pollTimer.start()

    def _onPoll(self) -> None:
        self._updateDownloadDialog()
        while self._jobs and self._jobs[0].future.done():
            job = self._jobs.popleft()
            try:
                job.onDone(job.future)
            except Exception as error:  # a handler bug must not stop the polling of later jobs
                logging.exception("SAM-Med3D: handling a finished job failed")
                self._setStatus(str(error))
        if not self._jobs:
            self._pollTimer.stop()
            self._restoreCursor()
            return
        head = self._jobs[0]
        concurrent.futures.wait([head.future], timeout=WORKER_TURN_S)
        if time.monotonic() - head.started > WAIT_CURSOR_AFTER_S:
            self._setStatus(head.label)
            if head.blocking and not self._waitCursorShown:
                slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
                self._waitCursorShown = True

    def _restoreCursor(self) -> None:
        if self._waitCursorShown:
            slicer.app.restoreOverrideCursor()
            self._waitCursorShown = False

    def _showError(self, message: str, error: Exception, quiet: bool = False) -> None:
        if isinstance(error, NoModelLoadedError):
            detail = _("No model is loaded: choose a model under Model and try again.")
        else:
            detail = str(error)
        logging.error(f"SAM-Med3D: {message} {detail}")
        self._setStatus(f"{message} {detail}")
        if not quiet and not slicer.app.testingEnabled():
            slicer.util.errorDisplay(f"{message}\n\n{detail}")

    # Shortcuts --------------------------------------------------------------------------------

    def _installShortcuts(self) -> None:
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None or self._shortcuts:
            return
        bindings = (
            ("Ctrl+Z", self.onUndo),
            ("Ctrl+Y", self.onRedo),
            ("Ctrl+Shift+Z", self.onRedo),
            ("I", self.onPlacePositive),
            ("E", self.onPlaceNegative),
            ("N", self.onNewSegment),
        )
        for keys, callback in bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.connect("activated()", callback)
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []


#
# SAMMed3DLogic
#


class _EngineState:
    """What the worker thread owns. Only functions running on the worker read or write it."""

    def __init__(self) -> None:
        self.predictor = None
        self.session = None


CANCELLED = "cancelled"  # the error of batch items a cancel skipped


@dataclass
class BatchOutcome:
    """One item of `segmentBatch`: where its result went, or why it failed."""

    source: str
    segmentationNode: Any = None
    segmentId: Optional[str] = None
    outputPath: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class SAMMed3DLogic(ScriptedLoadableModuleLogic):
    """Nodes in, segments out; usable from the Python console without the panel.

    Console use::

        logic = slicer.util.getModuleLogic("SAMMed3D")   # or SAMMed3D.SAMMed3DLogic()
        segmentationNode, segmentId = logic.segment(volumeNode, [[12.0, -40.5, 88.0]])

    Points are world RAS coordinates (what Slicer shows). All model work runs on one background thread
    (`self.worker`); the methods returning futures never block, the console methods wait.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._worker = None
        self._history = None
        self._engine = _EngineState()
        self._modelKey = None
        self._modelFuture = None
        self._preparedKey = None
        self._preparedFuture = None
        self._consolePrepared: Optional[tuple] = None  # (volume key, future) of a volume the panel is not on
        self._waitingPreview = None  # the future of the newest drag preview, cancelled by a release
        self.sessionStarted = False
        self.lastResult = None

    def getParameterNode(self) -> SAMMed3DParameterNode:
        return SAMMed3DParameterNode(super().getParameterNode())

    # Dependencies -----------------------------------------------------------------------------

    @staticmethod
    def torchAvailable() -> bool:
        return importlib.util.find_spec("torch") is not None

    def ensureTorch(self, askConfirmation: bool = True) -> bool:
        """Install PyTorch through the PyTorch extension if needed; False if the user declined."""
        if self.torchAvailable():
            from SAMMed3DLib.torch_version import require_supported_torch

            require_supported_torch()
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise MissingDependencyError(
                _(
                    "SAM-Med3D needs PyTorch: install the 'PyTorch' extension with the Extensions Manager, restart "
                    "Slicer, and try again."
                )
            ) from error
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        torch = torchLogic.installTorch(
            askConfirmation=askConfirmation, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}"
        )
        return torch is not None

    @property
    def worker(self):
        if self._worker is None:
            from SAMMed3DLib.worker import InferenceWorker

            self._worker = InferenceWorker()
        return self._worker

    @property
    def history(self):
        if self._history is None:
            from SAMMed3DLib.segment_history import SegmentHistory

            self._history = SegmentHistory()
        return self._history

    def historyIfStarted(self):
        return self._history

    def shutdown(self) -> None:
        """Stop the worker thread (the running step finishes; waiting ones are cancelled)."""
        if self._worker is not None:
            self._worker.shutdown(wait=False)
            self._worker = None
        self._engine = _EngineState()  # let the model go; a still running step keeps the old state to itself
        self._modelKey = self._modelFuture = None
        self._preparedKey = self._preparedFuture = None
        self._consolePrepared = None
        self._waitingPreview = None
        self.sessionStarted = False

    # Model ------------------------------------------------------------------------------------

    def modelRequested(self, checkpoint, device: str) -> bool:
        return self._modelKey == (self._checkpointKey(checkpoint), device)

    def modelReady(self) -> bool:
        future = self._modelFuture
        return future is not None and future.done() and not future.cancelled() and future.exception() is None

    def forgetModelRequest(self) -> None:
        self._modelKey = self._modelFuture = None

    def loadModel(self, checkpoint=None, device: str = "auto", progress: Optional[Callable] = None):
        """Future of {'device', 'checkpoint'}: resolve (maybe download) and load a checkpoint on the worker.

        checkpoint: None for the built-in demo model, "turbo" for the published SAM-Med3D-turbo, or a
        file path. The same request twice returns the first future.
        """
        key = (self._checkpointKey(checkpoint), device)
        if self._modelKey == key and self._modelFuture is not None:
            return self._modelFuture
        self._modelKey = key
        self._modelFuture = self.worker.submit(self._workLoadModel, checkpoint, device, progress)
        self.sessionStarted = False
        return self._modelFuture

    def useModel(self, model, device: str = "cpu"):
        """Future: use an already built network (tests, notebooks) instead of a checkpoint file."""
        self._modelKey = ("object", id(model), device)
        self._modelFuture = self.worker.submit(self._workUseModel, model, device)
        self.sessionStarted = False
        return self._modelFuture

    def fellBackToCpu(self) -> bool:
        predictor = self._engine.predictor
        return bool(predictor is not None and getattr(predictor, "fell_back_to_cpu", False))

    @staticmethod
    def _checkpointKey(checkpoint) -> str:
        return "demo" if checkpoint is None else str(checkpoint)

    @staticmethod
    def publishedCheckpointNeedsDownload(name: str) -> bool:
        """Whether loading the published checkpoint `name` downloads it (absent, or its cached copy damaged)."""
        from SAMMed3DLib.published import needs_download

        return needs_download(name)

    @staticmethod
    def checkpointCacheFolder() -> str:
        from SAMMed3DLib.published import cache_dir

        return str(cache_dir())

    def _workLoadModel(self, checkpoint, device: str, progress) -> dict:
        from SAMMed3DLib.checkpoint import load_model
        from SAMMed3DLib.device import resolve_device
        from SAMMed3DLib.published import resolve_checkpoint

        # The model asked for replaces the old one even if it fails to load: segmenting on with the old one would
        # write masks of a model the user no longer chose.
        self._engine.predictor = self._engine.session = None
        byHand = _("download the file yourself and choose it as the checkpoint file under Model")
        path = resolve_checkpoint(checkpoint, progress=progress, manual_hint=byHand)
        torchDevice = resolve_device(device)
        info = self._workUseModel(load_model(path, torchDevice), torchDevice)
        info["checkpoint"] = str(path)
        return info

    def _workUseModel(self, model, device) -> dict:
        from SAMMed3DLib.predictor import RegionPredictor

        self._engine.predictor = RegionPredictor(model, device)
        self._engine.session = None
        return {"device": self._engine.predictor.device.type, "checkpoint": ""}

    # Volumes and points -----------------------------------------------------------------------

    @staticmethod
    def volumeFromNode(volumeNode):
        """The engine's `Volume` for a scalar volume node: a copy of its voxels and its own IJK-to-RAS."""
        from SAMMed3DLib.volume import Volume

        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError(_("The volume has no voxels: load an image first."))
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise ValueError(_("The volume has several components per voxel: SAM-Med3D needs a scalar volume."))
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        return Volume.from_array(
            slicer.util.arrayFromVolume(volumeNode), slicer.util.arrayFromVTKMatrix(ijkToRas), name=volumeNode.GetName()
        )

    def prepareVolume(self, volumeNode):
        """Start resampling the volume on the worker; None when that is already done or under way."""
        key = self._volumeKey(volumeNode)
        if key == self._preparedKey and self._preparedFuture is not None:
            return None
        volume = self.volumeFromNode(volumeNode)
        self._preparedKey = key
        self._preparedFuture = self.worker.submit(self._workPrepare, volume)
        self.sessionStarted = False
        return self._preparedFuture

    def forgetPreparedVolume(self) -> None:
        self._preparedKey = self._preparedFuture = None

    @staticmethod
    def _volumeKey(volumeNode) -> tuple:
        imageData = volumeNode.GetImageData()
        if imageData is None:
            raise ValueError(_("The volume has no voxels: load an image first."))
        return volumeNode.GetID(), imageData.GetMTime(), SAMMed3DLogic._ijkToRasValues(volumeNode)

    @staticmethod
    def _ijkToRasValues(volumeNode) -> tuple:
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        return tuple(slicer.util.arrayFromVTKMatrix(ijkToRas).ravel().round(9).tolist())

    def _workPrepare(self, volume):
        from SAMMed3DLib.preprocess import PreparedVolume

        self._engine.session = None
        return PreparedVolume(volume)

    @staticmethod
    def worldToVolume(volumeNode, pointsWorld) -> np.ndarray:
        """World RAS points -> the volume's own RAS (through its parent transform, linear or not)."""
        toVolume = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volumeNode.GetParentTransformNode(), toVolume)
        return np.array([toVolume.TransformPoint([float(v) for v in p]) for p in pointsWorld], float).reshape(-1, 3)

    @staticmethod
    def volumeToWorld(volumeNode, pointsVolume) -> np.ndarray:
        """The inverse of `worldToVolume`."""
        toWorld = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volumeNode.GetParentTransformNode(), None, toWorld)
        return np.array([toWorld.TransformPoint([float(v) for v in p]) for p in pointsVolume], float).reshape(-1, 3)

    def clicksFromPrompts(self, volumeNode, prompts: Sequence) -> list:
        """((positive, world RAS), ...) -> engine `Click`s in the volume's own RAS, same order."""
        from SAMMed3DLib.session import Click

        if not prompts:
            return []
        local = self.worldToVolume(volumeNode, [point for positive, point in prompts])
        return [Click(tuple(float(v) for v in ras), bool(positive)) for ras, (positive, point) in zip(local, prompts)]

    # Interactive segmentation -----------------------------------------------------------------

    def requestSegmentation(
        self, volumeNode, clicks: Sequence, promptMode: str = "newest", preview: bool = False, coalesce: bool = True
    ):
        """Future of the `SessionResult` for `clicks`.

        preview=True computes without making the clicks the session's state (while a point is dragged).
        With `coalesce`, a newer request cancels this one while it still waits.
        """
        self.prepareVolume(volumeNode)
        arguments = (self._workSegment, self._preparedFuture, list(clicks), promptMode, preview)
        self.sessionStarted = True
        if not coalesce:
            return self.worker.submit(*arguments)
        if preview:
            self._waitingPreview = self.worker.submit_latest("segmentation preview", *arguments)
            return self._waitingPreview
        # A release is never cancelled by the next drag's previews (its drag would stay open in the undo history
        # and take in the next step); it makes a preview still waiting pointless (a running one just finishes).
        if self._waitingPreview is not None:
            self._waitingPreview.cancel()
            self._waitingPreview = None  # a finished one holds its result: whole-volume masks
        return self.worker.submit_latest("segmentation", *arguments)

    def endSession(self) -> None:
        """The next request starts a fresh session (other segment, accepted segment, new volume)."""
        self.sessionStarted = False
        self._waitingPreview = None
        if self._worker is not None:
            self._worker.submit(self._workEndSession)

    def _workEndSession(self) -> None:
        self._engine.session = None

    def _workSegment(self, preparedFuture, clicks: list, promptMode: str, preview: bool):
        from SAMMed3DLib.session import InteractiveSession

        prepared = preparedFuture.result()
        engine = self._engine
        if engine.predictor is None:
            raise NoModelLoadedError()
        session = engine.session
        if (
            session is None
            or session.prepared is not prepared
            or session.predictor is not engine.predictor
            or session.prompt_mode != promptMode
        ):
            session = engine.session = InteractiveSession(engine.predictor, prepared, prompt_mode=promptMode)
        return session.preview(clicks) if preview else session.set_clicks(clicks)

    # Segmentation nodes -----------------------------------------------------------------------

    @staticmethod
    def segmentKey(segmentationNode, segmentId: str) -> tuple[str, str]:
        return segmentationNode.GetID(), segmentId

    @staticmethod
    def nodesOfKey(key):
        """(segmentation node, segment id) of a key, or (None, None) when either is gone."""
        if not key:
            return None, None
        segmentationNode = slicer.mrmlScene.GetNodeByID(key[0])
        if segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(key[1]) is None:
            return None, None
        return segmentationNode, key[1]

    def ensureSegmentation(self, volumeNode, segmentationNode=None):
        """A segmentation on the volume's grid (created when None), with binary labelmaps as source."""
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} SAM-Med3D")
            )
            segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        elif segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        # Also for a node made by the panel's selector ("Create new Segmentation"), which gets no display node:
        # its segments would be written but never shown. Nothing happens where one exists.
        segmentationNode.CreateDefaultDisplayNodes()
        self._volumeIjkToSegmentation(volumeNode, segmentationNode)  # fails early for incompatible transforms
        labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        if segmentationNode.GetSegmentation().GetSourceRepresentationName() != labelmapName:
            _refuseSurfaceSource(segmentationNode)
            segmentationNode.CreateBinaryLabelmapRepresentation()
            segmentationNode.SetSourceRepresentationToBinaryLabelmap()
        return segmentationNode

    @staticmethod
    def addSegment(segmentationNode, name: Optional[str] = None) -> str:
        segmentation = segmentationNode.GetSegmentation()
        name = name or f"SAM-Med3D {segmentation.GetNumberOfSegments() + 1}"
        return segmentation.AddEmptySegment("", name)

    @staticmethod
    def markSegmentCompleted(segmentationNode, segmentId: str) -> None:
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is not None:
            slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(
                segment, slicer.vtkSlicerSegmentationsModuleLogic.Completed
            )

    @staticmethod
    def _volumeIjkToSegmentation(volumeNode, segmentationNode) -> np.ndarray:
        """4x4 from the volume's voxel indices to the segmentation node's coordinates."""
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        volumeToSegmentation = vtk.vtkMatrix4x4()
        if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode(), volumeToSegmentation
        ):
            raise ValueError(
                _(
                    "The segmentation and the volume are related by a non-linear transform: put the "
                    "segmentation under the same transform as the volume (Data module)."
                )
            )
        return slicer.util.arrayFromVTKMatrix(volumeToSegmentation) @ slicer.util.arrayFromVTKMatrix(ijkToRas)

    # Reading and writing segment voxels -------------------------------------------------------

    def _labelmapShift(self, labelmap, segmentationNode, volumeNode) -> Optional[tuple[int, int, int]]:
        """(i, j, k) with labelmap index = volume index + shift, or None when the grids differ."""
        from SAMMed3DLib.transforms import lattice_offset

        labelmapToSegmentation = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(labelmapToSegmentation)
        return lattice_offset(
            self._volumeIjkToSegmentation(volumeNode, segmentationNode),
            slicer.util.arrayFromVTKMatrix(labelmapToSegmentation),
            volumeNode.GetImageData().GetDimensions(),
        )

    def segmentBox(self, segmentationNode, segmentId: str, volumeNode):
        """A (K, J, I) box of the volume's grid outside which the segment has no voxels (None: none inside)."""
        from SAMMed3DLib.transforms import intersect_boxes, shift_box, vtk_extent_to_box

        labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        allocated = vtk_extent_to_box(labelmap.GetExtent()) if labelmap is not None else None
        if allocated is None:
            return None
        whole = vtk_extent_to_box(volumeNode.GetImageData().GetExtent())
        shift = self._labelmapShift(labelmap, segmentationNode, volumeNode)
        if shift is None:  # another grid: the segment may be anywhere on the volume's
            return whole
        return intersect_boxes(shift_box(allocated, [-s for s in shift]), whole)

    def segmentEquals(self, mask: np.ndarray, segmentationNode, segmentId: str, volumeNode) -> bool:
        """Whether the segment holds exactly the voxels of `mask` (K, J, I on the volume's grid)."""
        from SAMMed3DLib.transforms import bounding_box, union_box

        maskBox = bounding_box(mask > 0)
        heldBox = self.segmentBox(segmentationNode, segmentId, volumeNode)
        box = union_box(maskBox, heldBox) if maskBox and heldBox else maskBox or heldBox
        if box is None:
            return True
        held = self.readSegmentPatch(segmentationNode, segmentId, box, volumeNode)
        return bool(np.array_equal(held > 0, mask[box] > 0))

    def readSegmentPatch(self, segmentationNode, segmentId: str, box, volumeNode) -> np.ndarray:
        """The segment's voxels (0/1, uint8) inside a (K, J, I) box of the volume's grid."""
        from SAMMed3DLib.transforms import box_shape, intersect_boxes, relative_box, shift_box, vtk_extent_to_box

        patch = np.zeros(box_shape(box), np.uint8)
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        if segment is None or labelmap is None:
            return patch
        allocated = vtk_extent_to_box(labelmap.GetExtent())
        if allocated is None:
            return patch
        shift = self._labelmapShift(labelmap, segmentationNode, volumeNode)
        if shift is None:  # another grid: let Slicer resample the segment onto the volume (slow, exact)
            whole = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            return (whole[tuple(box)] > 0).astype(np.uint8)
        boxInLabelmap = shift_box(box, shift)
        common = intersect_boxes(boxInLabelmap, allocated)
        if common is not None:
            voxels = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, segmentId)
            inside = voxels[relative_box(common, allocated)] == segment.GetLabelValue()
            patch[relative_box(common, boxInLabelmap)] = inside
        return patch

    def writeSegmentPatch(
        self,
        segmentationNode,
        segmentId: str,
        box,
        patch: np.ndarray,
        volumeNode,
        current: Optional[np.ndarray] = None,
        overwritable: Sequence[str] = (),
    ) -> None:
        """Make the segment equal `patch` inside the box; voxels outside the box are not touched.

        Other segments keep their voxels (Slicer moves this segment to its own layer if they would
        clash) unless their ids are in `overwritable`.
        """
        from SAMMed3DLib.transforms import box_to_vtk_extent

        patch = (np.asarray(patch) > 0).astype(np.uint8)
        if current is None:
            current = self.readSegmentPatch(segmentationNode, segmentId, box, volumeNode)
        removes = bool(np.any((current > 0) & (patch == 0)))
        adds = bool(np.any((patch > 0) & (current == 0)))
        if not removes and not adds:
            return
        labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        if labelmap is not None and self._labelmapShift(labelmap, segmentationNode, volumeNode) is None:
            # On another grid Slicer resamples the whole layer the segment shares onto the patch's grid: the other
            # segments of that layer would move with it, outside this module's undo. Alone, only this one does.
            segmentationNode.GetSegmentation().SeparateSegmentLabelmap(segmentId)
        modifier = self._orientedPatch(patch, box, self._volumeIjkToSegmentation(volumeNode, segmentationNode))
        extent = list(box_to_vtk_extent(box))
        segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic
        modes = ([segmentationsLogic.MODE_MERGE_MIN] if removes else []) + (
            [segmentationsLogic.MODE_MERGE_MASK] if adds else []
        )
        for mode in modes:  # MIN clears this segment where the patch is 0; MASK sets it where it is 1
            if not segmentationsLogic.SetBinaryLabelmapToSegment(
                modifier, segmentationNode, segmentId, mode, extent, False, list(overwritable)
            ):
                raise RuntimeError(_("Slicer refused to update segment '{segment}'.").format(segment=segmentId))

    @staticmethod
    def _orientedPatch(patch: np.ndarray, box, ijkToSegmentation: np.ndarray):
        """A vtkOrientedImageData holding `patch` at the box's place in the volume's voxel grid."""
        from SAMMed3DLib.transforms import box_to_vtk_extent

        image = slicer.vtkOrientedImageData()
        image.SetExtent(*box_to_vtk_extent(box))
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        voxels = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(patch.shape)
        voxels[:] = patch
        image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijkToSegmentation))
        return image

    def applyResult(
        self,
        result,
        segmentationNode,
        segmentId: str,
        volumeNode,
        overwriteOthers: bool = False,
        promptsBefore: Any = None,
        promptsAfter: Any = None,
        preview: bool = False,
        record: bool = True,
    ):
        """Write a `SessionResult` into one segment and record it for undo (unless `record` is False: a batch's
        steps would push the panel's older steps out of the history's memory cap).

        Only voxels inside `result.changed` are written, and of those only the ones the model changed (edits made
        there by hand, e.g. with the Segment Editor, stay), except for the first result of a session with a mask:
        that one replaces the segment whole (it may hold voxels from before the session, which the session never
        saw). Exclude points alone give no mask and change nothing.
        Other segments are changed only with `overwriteOthers`, and then only where the new mask is.
        Returns the recorded `HistoryStep`; what was written before a failure is recorded too. A later result of
        a session is refused when the volume has moved in the segmentation since the segment's last step.
        """
        from SAMMed3DLib.segment_history import HistoryStep

        key, grid = self.segmentKey(segmentationNode, segmentId), self.gridKey(volumeNode, segmentationNode)
        self._refuseMovedSession(result, key, grid)
        box = self._boxToWrite(result, segmentationNode, segmentId, volumeNode)
        changes = []
        try:
            if box is not None:
                patch = (result.mask[box] > 0).astype(np.uint8)
                previous = None if result.first or result.previous is None else (result.previous[box] > 0)
                self._writeTracked(
                    segmentationNode, segmentId, box, patch, volumeNode, overwriteOthers, changes, previous
                )
        finally:
            changes = tuple(c for c in changes if c is not None)
            step = HistoryStep(key, changes, promptsBefore, promptsAfter, grid=grid)
            if record:
                self.history.record(step, preview=preview)
        return step

    def _refuseMovedSession(self, result, key, grid: tuple) -> None:
        """A session's later masks are written as changes to the one before, at the voxels where the volume lay in
        the segmentation then: not once a transform has moved one of the two."""
        history = self.historyIfStarted()
        last = history.next_undo(key) if history is not None and not result.first else None
        if last is not None and last.grid is not None and last.grid != grid:
            raise ValueError(
                _(
                    "The volume moved relative to the segmentation since the last point (a transform changed). "
                    "Click a point to go on: a new model session starts, whose mask replaces the segment."
                )
            )

    @staticmethod
    def gridKey(volumeNode, segmentationNode) -> tuple:
        """What undo boxes are indexed on: the volume, and where its voxels lie in the segmentation (a transform
        that moves one and not the other, say a registration, moves the boxes' voxels elsewhere)."""
        try:
            placement = SAMMed3DLogic._volumeIjkToSegmentation(volumeNode, segmentationNode)
        except ValueError:  # a non-linear transform between them: nothing is written there either
            return volumeNode.GetID(), None
        return volumeNode.GetID(), tuple(placement.ravel().round(6).tolist())

    def _boxToWrite(self, result, segmentationNode, segmentId: str, volumeNode):
        """`result.changed`, grown over the segment's present voxels for a session's first result."""
        from SAMMed3DLib.transforms import union_box

        box = tuple(result.changed) if result.changed is not None else None
        if result.first:
            present = self.segmentBox(segmentationNode, segmentId, volumeNode)
            if present is not None:
                box = present if box is None else union_box(box, present)
        return box

    def _writeTracked(
        self, segmentationNode, segmentId, box, patch, volumeNode, overwriteOthers, changes, previous=None
    ) -> None:
        """Write a patch, erasing it from other segments when asked, appending each `PatchChange` (or None) to
        `changes` before its write: undo only reverts voxels that reached the new state, so a write that
        fails part-way is still undone exactly as far as it got. With `previous` (the model's mask before, as
        bool over the box), voxels where the model's mask did not change keep what the segment holds."""
        from SAMMed3DLib.segment_history import patch_change

        others = [i for i in segmentationNode.GetSegmentation().GetSegmentIDs() if i != segmentId]
        with slicer.util.RenderBlocker(), _KeepClosedSurface(segmentationNode):
            # Other segments lose only voxels the model newly puts in this one (not those kept as they were).
            taken = patch if previous is None else (patch.astype(bool) & ~previous).astype(np.uint8)
            if overwriteOthers:
                for other in others:
                    before = self.readSegmentPatch(segmentationNode, other, box, volumeNode)
                    if not np.any(before & taken):
                        continue
                    after = before & (1 - taken)
                    changes.append(patch_change(self.segmentKey(segmentationNode, other), box, before, after))
                    self.writeSegmentPatch(segmentationNode, other, box, after, volumeNode, current=before)
            before = self.readSegmentPatch(segmentationNode, segmentId, box, volumeNode)
            if previous is not None:
                patch = np.where(patch.astype(bool) != previous, patch, before).astype(np.uint8)
            changes.append(patch_change(self.segmentKey(segmentationNode, segmentId), box, before, patch))
            self.writeSegmentPatch(
                segmentationNode,
                segmentId,
                box,
                patch,
                volumeNode,
                current=before,
                overwritable=others if overwriteOthers else (),
            )
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic
        if segmentationsLogic.GetSegmentStatus(segment) == segmentationsLogic.NotStarted:
            segmentationsLogic.SetSegmentStatus(segment, segmentationsLogic.InProgress)

    def undo(self, segmentationNode, segmentId: str, volumeNode):
        """Revert the segment's last step (its own voxels first, then others it overwrote); the step or None."""
        refusal = self.undoRefusal(segmentationNode, segmentId, volumeNode, undo=True)
        if refusal:
            raise ValueError(refusal)
        step = self.history.undo(self.segmentKey(segmentationNode, segmentId))
        if step is not None:
            self._applyStep(step, segmentationNode, volumeNode, undo=True)
        return step

    def redo(self, segmentationNode, segmentId: str, volumeNode):
        refusal = self.undoRefusal(segmentationNode, segmentId, volumeNode, undo=False)
        if refusal:
            raise ValueError(refusal)
        step = self.history.redo(self.segmentKey(segmentationNode, segmentId))
        if step is not None:
            self._applyStep(step, segmentationNode, volumeNode, undo=False)
        return step

    def undoRefusal(self, segmentationNode, segmentId: str, volumeNode, undo: bool = True) -> Optional[str]:
        """Why the segment's next undo (or redo) step cannot be applied with this volume, or None."""
        key = self.segmentKey(segmentationNode, segmentId)
        step = self.history.next_undo(key) if undo else self.history.next_redo(key)
        return self._gridRefusal(step, volumeNode, segmentationNode)

    def _gridRefusal(self, step, volumeNode, segmentationNode) -> Optional[str]:
        """A step's boxes are voxels of the volume it was made on: applied on another grid they would land elsewhere."""
        if step is None or step.grid is None or step.grid == self.gridKey(volumeNode, segmentationNode):
            return None
        madeOn = slicer.mrmlScene.GetNodeByID(step.grid[0])
        if madeOn is not None and madeOn is not volumeNode:
            text = _(
                "This step was made on the volume '{name}': select that volume, then this segment, to undo or redo it."
            )
            return text.format(name=madeOn.GetName())
        return _(
            "The volume of this step was removed, its voxel grid changed, or it moved relative to the segmentation "
            "(a transform) since: it cannot be undone."
        )

    def _applyStep(self, step, segmentationNode, volumeNode, undo: bool) -> None:
        ownFirst = sorted(step.changes, key=lambda change: change.segment_id != step.segment_id)
        changes = ownFirst if undo else list(reversed(ownFirst))
        with slicer.util.RenderBlocker(), _KeepClosedSurface(segmentationNode):
            for change in changes:
                target, segmentId = self.nodesOfKey(change.segment_id)
                if target is None:
                    continue  # the segment was deleted since
                current = self.readSegmentPatch(target, segmentId, change.box, volumeNode)
                wanted = change.undo_onto(current) if undo else change.redo_onto(current)
                self.writeSegmentPatch(target, segmentId, change.box, wanted, volumeNode, current=current)

    # Region boxes -----------------------------------------------------------------------------

    def showRegionBoxes(self, volumeNode, regions: Optional[Sequence], visible: bool = True) -> None:
        """Show one ROI per region (None: keep the current boxes, only change visibility)."""
        boxes = self.regionBoxNodes()
        if regions is not None:
            from SAMMed3DLib.transforms import object_to_node

            while len(boxes) < len(regions):
                boxes.append(self._createRegionBox(len(boxes) + 1))
            for roi, region in zip(boxes, regions):
                roi.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID() if volumeNode else None)
                rotation = object_to_node((0.0, 0.0, 0.0), np.asarray(region.axes))
                roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(rotation))
                roi.SetCenter([float(v) for v in region.center_ras])
                roi.SetSize([float(v) for v in region.size_mm])
            for roi in boxes[len(regions) :]:
                slicer.mrmlScene.RemoveNode(roi)
            boxes = boxes[: len(regions)]
        for roi in boxes:
            roi.GetDisplayNode().SetVisibility(visible)

    @staticmethod
    def regionBoxNodes() -> list:
        """The ROI nodes that show regions, oldest first."""
        roiNodes = slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")
        return [roi for roi in roiNodes if roi.GetAttribute(REGION_BOX_ATTRIBUTE)]

    @staticmethod
    def _createRegionBox(number: int):
        # The markups logic makes every markups node added the one the mouse places into: without this, the next
        # click in a view would start drawing a new ROI instead of placing a prompt point.
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        placeClassName = selectionNode.GetActivePlaceNodeClassName()
        placeNodeID = selectionNode.GetActivePlaceNodeID()
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"SAM-Med3D region {number}")
        selectionNode.SetReferenceActivePlaceNodeClassName(placeClassName)
        selectionNode.SetReferenceActivePlaceNodeID(placeNodeID)
        roi.SetAttribute(REGION_BOX_ATTRIBUTE, "1")
        roi.SetSaveWithScene(False)
        roi.CreateDefaultDisplayNodes()
        roi.SetLocked(True)
        display = roi.GetDisplayNode()
        display.SetSaveWithScene(False)  # each node has its own flag: a saved scene would keep an orphan display node
        display.SetHandlesInteractive(False)
        display.SetFillVisibility(False)
        display.SetSelectedColor(*REGION_BOX_COLOR)
        display.SetColor(*REGION_BOX_COLOR)
        display.SetPointLabelsVisibility(False)
        return roi

    # Console API ------------------------------------------------------------------------------

    def segment(
        self,
        volumeNode,
        positivePointsRAS: Sequence,
        negativePointsRAS: Sequence = (),
        segmentationNode=None,
        segmentName: Optional[str] = None,
        checkpoint=None,
        device: str = "auto",
        recordUndo: bool = True,
    ):
        """Segment one structure from world-RAS points; returns (segmentationNode, segmentId). Blocks.

        checkpoint: None keeps the model already loaded here (else the panel's model choice), "turbo" or
        "demo" or a checkpoint file path. Positive points are applied first, then negative ones. The
        result is one undoable step (`undo(segmentationNode, segmentId, volumeNode)`) unless `recordUndo` is False.
        """
        positive, negative = _pointsList(positivePointsRAS), _pointsList(negativePointsRAS)
        if not positive:
            raise ValueError(_("Give at least one positive point (world RAS)."))
        if volumeNode is None or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(_("Give a scalar image volume: a labelmap volume holds labels, not an image."))
        if not self.ensureTorch(askConfirmation=not slicer.app.testingEnabled()):
            raise MissingDependencyError(_("PyTorch is needed and was not installed."))
        from SAMMed3DLib.session import InteractiveSession  # imports torch: only once it is there

        if segmentationNode is not None:
            _refuseSurfaceSource(segmentationNode)  # before the work, not after it
        prompts = tuple((True, point) for point in positive) + tuple((False, point) for point in negative)
        clicks = self.clicksFromPrompts(volumeNode, prompts)
        self._loadModelForConsole(checkpoint, device)
        prepared = self._preparedForConsole(volumeNode)
        engine = self._engine

        def run():
            session = InteractiveSession(engine.predictor, prepared.result())
            return session.set_clicks(clicks)

        with slicer.util.WaitCursor():
            try:
                result = self.worker.submit(run).result()
            except Exception:
                self._forgetFailedPreparation(prepared)
                raise
        created = segmentationNode is None
        segmentationNode = self.ensureSegmentation(volumeNode, segmentationNode)
        try:
            segmentId = self.addSegment(segmentationNode, segmentName)
            self.applyResult(
                result,
                segmentationNode,
                segmentId,
                volumeNode,
                promptsBefore=(),
                promptsAfter=prompts,
                record=recordUndo,
            )
        except Exception:
            if created:  # not left behind half made
                slicer.mrmlScene.RemoveNode(segmentationNode)
            raise
        self.lastResult = result
        return segmentationNode, segmentId

    def _preparedForConsole(self, volumeNode):
        """The resampled volume: the shared one unless the panel's session works on another volume, which a
        console call must not end (its resampling and embeddings would have to be made again); such a volume is
        kept apart for the next console call."""
        key = self._volumeKey(volumeNode)
        if not self.sessionStarted or key == self._preparedKey:
            self.prepareVolume(volumeNode)
            return self._preparedFuture
        if self._consolePrepared is None or self._consolePrepared[0] != key:
            from SAMMed3DLib.preprocess import PreparedVolume

            self._consolePrepared = key, self.worker.submit(PreparedVolume, self.volumeFromNode(volumeNode))
        return self._consolePrepared[1]

    def _forgetFailedPreparation(self, prepared) -> None:
        """A failed resampling (e.g. out of memory) is made again next time, not answered from the cache."""
        if not prepared.done() or prepared.cancelled() or prepared.exception() is None:
            return
        if prepared is self._preparedFuture:
            self.forgetPreparedVolume()
        if self._consolePrepared is not None and self._consolePrepared[1] is prepared:
            self._consolePrepared = None

    def _loadModelForConsole(self, checkpoint, device: str) -> None:
        if checkpoint is None and self._modelFuture is not None:
            self._waitForModel(self._modelFuture)
            return
        if checkpoint is None:
            parameters = self.getParameterNode()
            checkpoint = {ModelChoice.TURBO: "turbo", ModelChoice.DEMO: None}.get(
                parameters.model, str(parameters.checkpointPath)
            )
        elif checkpoint == "demo":
            checkpoint = None
        self._waitForModel(self.loadModel(checkpoint, device))

    def _waitForModel(self, future) -> None:
        """Wait for a model load; a failed one is forgotten, so that the next call (or the panel) tries again."""
        try:
            with slicer.util.WaitCursor():
                future.result()
        except Exception:
            if self._modelFuture is future:
                self.forgetModelRequest()
            raise

    def segmentBatch(
        self,
        volumeNodesOrFiles: Sequence,
        pointsPerVolume: Sequence,
        outputDirectory=None,
        checkpoint=None,
        device: str = "auto",
        overwrite: bool = False,
    ) -> list:
        """Segment many volumes, one structure each; a failing item is reported and the rest still run. Blocks
        Slicer until done (the progress dialog cancels between items).

        volumeNodesOrFiles: volume nodes or image file paths. pointsPerVolume: per item, {"positive": [...],
        "negative": [...]} or a list of positive points, in world RAS. outputDirectory: if given, each
        segmentation is saved there as <name>.seg.nrrd (a repeated name gets _2, _3...; an existing file is an
        error unless `overwrite`), and volumes loaded from files are removed from the scene again once saved,
        so that a long list does not fill the memory. Batch steps are not recorded for undo.
        Returns a `BatchOutcome` per item (error "cancelled" for items a cancel skipped).
        """
        items, pointsPerVolume = list(volumeNodesOrFiles), list(pointsPerVolume)
        if len(items) != len(pointsPerVolume):
            raise ValueError(_("Give one list of points per volume."))
        if not self.ensureTorch(askConfirmation=not slicer.app.testingEnabled()):  # asked once, not per item
            raise MissingDependencyError(_("PyTorch is needed and was not installed."))
        self._loadModelForConsole(checkpoint, device)  # once: a model that fails to load fails the batch at once
        outputFolder = pathlib.Path(outputDirectory) if outputDirectory else None
        if outputFolder is not None:
            outputFolder.mkdir(parents=True, exist_ok=True)
        outputNames = _uniqueNames([self._outputName(item) for item in items])
        progress = slicer.util.createProgressDialog(
            maximum=len(items), windowTitle=_("SAM-Med3D batch"), autoClose=False
        )
        outcomes = []
        try:
            for number, (item, points) in enumerate(zip(items, pointsPerVolume)):
                slicer.app.processEvents()  # before the check: a cancel clicked during the last item counts now
                if progress.wasCanceled:
                    outcomes += [
                        BatchOutcome(source=self._describeItem(rest), error=CANCELLED) for rest in items[number:]
                    ]
                    break
                progress.labelText = _("Segmenting {item} ({number} of {count})...").format(
                    item=self._describeItem(item), number=number + 1, count=len(items)
                )
                progress.value = number
                slicer.app.processEvents()
                output = outputFolder / f"{outputNames[number]}.seg.nrrd" if outputFolder is not None else None
                outcomes.append(self._segmentBatchItem(item, points, output, overwrite, checkpoint, device))
        finally:
            progress.close()
        failures = [o for o in outcomes if not o.ok and o.error != CANCELLED]
        for outcome in failures:
            logging.error(f"SAM-Med3D batch: {outcome.source}: {outcome.error}")
        if failures and not slicer.app.testingEnabled():
            slicer.util.warningDisplay(
                _("{failed} of {count} volumes failed:").format(failed=len(failures), count=len(outcomes))
                + "\n"
                + "\n".join(f"{o.source}: {o.error}" for o in failures)
            )
        return outcomes

    @staticmethod
    def _describeItem(item) -> str:
        return item.GetName() if hasattr(item, "GetName") else str(item)

    @classmethod
    def _outputName(cls, item) -> str:
        """A node's name, or a file's name without its image extension (the node loaded from it may be renamed)."""
        if hasattr(item, "GetName"):
            return item.GetName()
        from SAMMed3DLib.imageio import image_stem

        try:
            return image_stem(item)
        except TypeError:  # not a path at all: the item's own error is reported when it is reached
            return cls._describeItem(item)

    def _segmentBatchItem(self, item, points, output, overwrite: bool, checkpoint, device: str) -> BatchOutcome:
        outcome = BatchOutcome(source=self._describeItem(item))
        loaded = []  # nodes this item added to the scene from a file, removed again once saved
        try:
            if output is not None and output.exists() and not overwrite:
                raise FileExistsError(
                    _("{path} already exists; pass overwrite=True to replace it.").format(path=output)
                )
            if hasattr(item, "GetImageData"):
                volumeNode = item
            else:
                volumeNode = slicer.util.loadVolume(str(item), {"show": False})
                loaded.append(volumeNode)
            positive, negative = self._splitPoints(points)
            segmentationNode, segmentId = self.segment(
                volumeNode, positive, negative, checkpoint=checkpoint, device=device, recordUndo=False
            )
            loaded.append(segmentationNode)
            outcome.segmentationNode, outcome.segmentId = segmentationNode, segmentId
            if output is not None:
                _saveNodeWhole(segmentationNode, output)
                outcome.outputPath = str(output)
        except Exception as error:  # one broken item must not stop the batch
            outcome.error = str(error) or type(error).__name__
        fromFile = not hasattr(item, "GetImageData")
        if fromFile and output is not None and (outcome.ok or len(loaded) == 1):
            # Saved, or failed before a segmentation existed: a long list of files must not fill the memory. An
            # unsaved segmentation stays in the scene with its volume, to be saved by hand.
            for node in loaded:
                slicer.mrmlScene.RemoveNode(node)
            outcome.segmentationNode = outcome.segmentId = None
        return outcome

    @staticmethod
    def _splitPoints(points) -> tuple[list, list]:
        if isinstance(points, dict):
            return list(points.get("positive", ())), list(points.get("negative", ()))
        return list(points), []


class _KeepClosedSurface:
    """Context manager: re-create the 3D (closed surface) representation if it was shown before."""

    def __init__(self, segmentationNode) -> None:
        self.segmentationNode = segmentationNode
        name = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
        self.hadSurface = segmentationNode.GetSegmentation().ContainsRepresentation(name)

    def __enter__(self):
        return self

    def __exit__(self, *exception) -> None:
        if self.hadSurface:
            self.segmentationNode.CreateClosedSurfaceRepresentation()


def _safeFileName(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "volume"


def _refuseSurfaceSource(segmentationNode) -> None:
    """Segments whose source is not a binary labelmap (surfaces, usually) would be replaced by a conversion."""
    segmentation = segmentationNode.GetSegmentation()
    labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() > 0 and segmentation.GetSourceRepresentationName() != labelmapName:
        raise ValueError(
            _(
                "The segmentation '{name}' is stored as {source}, not as a binary labelmap; converting it would "
                "replace its segments: convert it in the Segmentations module first, or choose another segmentation."
            ).format(name=segmentationNode.GetName(), source=segmentation.GetSourceRepresentationName())
        )


def _uniqueNames(names: Sequence[str]) -> list[str]:
    """File-safe names, a repeated one (letter case ignored, as on macOS and Windows) with _2, _3... added."""
    used: set[str] = set()
    unique = []
    for name in names:
        base = candidate = _safeFileName(name)
        number = 1
        while candidate.casefold() in used:
            number += 1
            candidate = f"{base}_{number}"
        used.add(candidate.casefold())
        unique.append(candidate)
    return unique


def _saveNodeWhole(node, path: pathlib.Path) -> None:
    """Save through a temporary file beside `path`, renamed into place: a failed write leaves no half file."""
    from SAMMed3DLib.atomic import atomic_destination

    try:
        with atomic_destination(path, ".seg.nrrd") as temporary:
            if not slicer.util.saveNode(node, str(temporary)):
                raise OSError(_("Could not write {path}.").format(path=path))
    finally:
        storageNode = node.GetStorageNode()
        if storageNode is not None:  # Save Data offers the real name, never the temporary one
            storageNode.SetFileName(str(path))


def _pointsList(points) -> list[tuple[float, float, float]]:
    """Points as (x, y, z) tuples from a list or array of points, a single [x, y, z], or None."""
    if points is None:
        return []
    array = np.asarray(points, dtype=float)
    if array.size == 0:
        return []
    if array.shape == (3,):
        array = array[np.newaxis]
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(
            _("Give points as [x, y, z] or a list of [x, y, z] (world RAS), not {shape}.").format(shape=array.shape)
        )
    return [tuple(float(v) for v in point) for point in array]


#
# SAMMed3DTest
#


class SAMMed3DTest(ScriptedLoadableModuleTest):
    """Offline, CPU-only: a synthetic oblique volume under a parent transform, world-coordinate points.

    Uses the built-in demo model when it is installed (then the mask must match the bright sphere),
    else a tiny randomly initialised network (then only geometry is asserted: a random network's mask
    means nothing). Writing, undo and other-segment protection are checked with known masks, so they
    do not depend on the model at all.
    """

    def setUp(self) -> None:
        if not SAMMed3DLogic.torchAvailable():
            self.skipTest("PyTorch is not installed (PyTorch extension)")
        from SAMMed3DLib import synthetic  # after the check above: the test runs the engine, which needs PyTorch

        self.synthetic = synthetic
        slicer.mrmlScene.Clear()
        self.logic = SAMMed3DLogic()

    def tearDown(self) -> None:
        self.logic.shutdown()

    def runTest(self) -> None:
        if not SAMMed3DLogic.torchAvailable():
            self.delayDisplay("PyTorch is not installed (PyTorch extension): SAM-Med3D logic tests skipped.")
            return
        for test in (
            self.test_PointsMapThroughParentTransform,
            self.test_WritingUndoAndOtherSegments,
            self.test_HandEditsWhereTheModelChangedNothingStay,
            self.test_UndoOnAnotherVolumeIsRefused,
            self.test_AVolumeMovedFromItsSegmentationIsNotWrittenAsBefore,
            self.test_NewSessionReplacesTheSegment,
            self.test_ExcludePointsAloneKeepTheSegment,
            self.test_FailedWriteIsUndoable,
            self.test_SegmentFromWorldPoints,
            self.test_MovingAPointChangesTheResult,
            self.test_BatchContinuesPastFailures,
            self.test_BatchOutputsNeverCollideOrPileUp,
        ):
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()
        self.delayDisplay("SAM-Med3D tests passed")

    # Scene ------------------------------------------------------------------------------------

    def _parentToWorld(self) -> np.ndarray:
        angle = np.radians(30.0)
        matrix = np.eye(4)
        matrix[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
        matrix[:3, 3] = (10.0, -20.0, 5.0)
        return matrix

    def _createScene(self):
        """(volume node, sphere mask KJI, sphere centre in world RAS)."""
        synthetic = self.synthetic
        sphere = synthetic.sphere_mask(synthetic.CENTER_IJK)
        ijkToRas, parentToWorld = synthetic.oblique_ijk_to_ras(), self._parentToWorld()
        volumeNode = slicer.util.addVolumeFromArray(
            synthetic.bright_sphere_image(), ijkToRas, name="SAMMed3D test volume"
        )
        transformNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "SAMMed3D test transform")
        transformNode.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(parentToWorld))
        volumeNode.SetAndObserveTransformNodeID(transformNode.GetID())
        centerLocal = ijkToRas @ np.array([*synthetic.CENTER_IJK, 1.0])
        centerWorld = (parentToWorld @ centerLocal)[:3]
        return volumeNode, sphere, centerWorld

    def _useTestModel(self) -> bool:
        """Load the demo model if installed (True), else a tiny random network (False)."""
        from SAMMed3DLib.published import DEMO_CHECKPOINT

        if DEMO_CHECKPOINT.is_file():
            self.logic.loadModel(None, "cpu").result()
            return True
        import torch

        from SAMMed3DLib.config import ModelConfig, build_model

        torch.manual_seed(0)
        tiny = ModelConfig(
            encoder_embed_dim=48,
            encoder_depth=2,
            encoder_num_heads=2,
            encoder_global_attn_indexes=(1,),
            prompt_embed_dim=48,
            mask_in_chans=4,
            iou_head_hidden_dim=16,
            decoder_mlp_dim=32,
        )
        self.logic.useModel(build_model(tiny), "cpu").result()
        return False

    @staticmethod
    def _segmentArray(segmentationNode, segmentId, volumeNode) -> np.ndarray:
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        return (voxels > 0).astype(np.uint8)

    @staticmethod
    def _fakeResult(mask: np.ndarray, previous: Optional[np.ndarray] = None, first: bool = False):
        """A `SessionResult` with a known mask, `changed` bounding its difference from `previous`
        (`first`: the first result of a session, after one click)."""
        from SAMMed3DLib.segment_history import differing_box
        from SAMMed3DLib.session import Click, SessionResult

        changed = differing_box(np.zeros_like(mask) if previous is None else previous, mask)
        clicks = (Click((0.0, 0.0, 0.0)),) if first else ()
        return SessionResult(
            clicks=clicks, mask=mask, iou=1.0, regions=[], timings={}, changed=changed, first=first, previous=previous
        )

    def _sceneWithSphereSegment(self):
        """(volume node, sphere mask KJI, segmentation node, id of a segment the sphere was written into)."""
        volumeNode, sphere, _centerWorld = self._createScene()
        segmentationNode = self.logic.ensureSegmentation(volumeNode)
        segmentId = self.logic.addSegment(segmentationNode, "sphere")
        self.logic.applyResult(self._fakeResult(sphere, first=True), segmentationNode, segmentId, volumeNode)
        return volumeNode, sphere, segmentationNode, segmentId

    def _segmentWithSlab(self, volumeNode, sphere: np.ndarray):
        """A segmentation with one segment holding a slab that reaches far beyond the sphere's box."""
        segmentationNode = self.logic.ensureSegmentation(volumeNode)
        segmentId = self.logic.addSegment(segmentationNode, "slab")
        slab = np.zeros_like(sphere)
        slab[:, :, 25:40] = 1
        self.logic.applyResult(self._fakeResult(slab), segmentationNode, segmentId, volumeNode)
        return segmentationNode, segmentId, slab

    # Tests ------------------------------------------------------------------------------------

    def test_PointsMapThroughParentTransform(self) -> None:
        self.delayDisplay("World points -> volume-local RAS -> voxel")
        volumeNode, sphere, centerWorld = self._createScene()
        clicks = self.logic.clicksFromPrompts(volumeNode, [(True, tuple(centerWorld)), (False, tuple(centerWorld + 5))])
        expectedLocal = (self.synthetic.oblique_ijk_to_ras() @ np.array([*self.synthetic.CENTER_IJK, 1.0]))[:3]
        np.testing.assert_allclose(clicks[0].ras, expectedLocal, atol=1e-6)
        self.assertTrue(clicks[0].positive)
        self.assertFalse(clicks[1].positive)
        volume = self.logic.volumeFromNode(volumeNode)
        np.testing.assert_allclose(volume.ras_to_ijk([clicks[0].ras])[0], self.synthetic.CENTER_IJK, atol=1e-6)
        np.testing.assert_allclose(self.logic.volumeToWorld(volumeNode, [clicks[0].ras])[0], centerWorld, atol=1e-6)

    def test_WritingUndoAndOtherSegments(self) -> None:
        self.delayDisplay("Box-limited writes, undo/redo, other segments protected")
        volumeNode, sphere, centerWorld = self._createScene()
        logic = self.logic
        segmentationNode, other, slab = self._segmentWithSlab(volumeNode, sphere)
        target = logic.addSegment(segmentationNode, "target")

        logic.applyResult(self._fakeResult(sphere), segmentationNode, target, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, target, volumeNode), sphere)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, other, volumeNode), slab)

        i, j, k = self.synthetic.CENTER_IJK
        moved = self.synthetic.sphere_mask((i - 6, j + 3, k))
        logic.applyResult(self._fakeResult(moved, sphere), segmentationNode, target, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, target, volumeNode), moved)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, other, volumeNode), slab)

        logic.undo(segmentationNode, target, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, target, volumeNode), sphere)
        logic.redo(segmentationNode, target, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, target, volumeNode), moved)

        overwriting = logic.addSegment(segmentationNode, "overwriting")
        logic.applyResult(self._fakeResult(sphere), segmentationNode, overwriting, volumeNode, overwriteOthers=True)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, overwriting, volumeNode), sphere)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, other, volumeNode), slab & (1 - sphere))
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, target, volumeNode), moved & (1 - sphere))
        logic.undo(segmentationNode, overwriting, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, other, volumeNode), slab)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, target, volumeNode), moved)
        self.assertEqual(int(self._segmentArray(segmentationNode, overwriting, volumeNode).sum()), 0)

    def test_HandEditsWhereTheModelChangedNothingStay(self) -> None:
        self.delayDisplay("A new mask changes only the voxels the model changed; hand edits elsewhere stay")
        volumeNode, sphere, segmentationNode, segmentId = self._sceneWithSphereSegment()
        logic = self.logic
        i, j, k = self.synthetic.CENTER_IJK
        moved = self.synthetic.sphere_mask((i - 6, j + 3, k))
        changed = self._fakeResult(moved, sphere)
        edited = sphere.copy()
        edited[k, j, i] = 0  # a hole painted by hand inside the box that the next mask changes, where it stays 1
        self.assertTrue(sphere[k, j, i] and moved[k, j, i])
        whole = tuple(slice(0, n) for n in sphere.shape)
        logic.writeSegmentPatch(segmentationNode, segmentId, whole, edited, volumeNode)
        logic.applyResult(changed, segmentationNode, segmentId, volumeNode)
        expected = moved.copy()
        expected[k, j, i] = 0
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), expected)
        logic.undo(segmentationNode, segmentId, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), edited)

    def test_UndoOnAnotherVolumeIsRefused(self) -> None:
        self.delayDisplay("Undo boxes belong to the volume they were made on")
        volumeNode, sphere, segmentationNode, segmentId = self._sceneWithSphereSegment()
        logic = self.logic
        otherVolume = slicer.util.addVolumeFromArray(
            self.synthetic.bright_sphere_image()[:, ::2, ::2].copy(), np.diag([2.0, 2.0, 1.0, 1.0]), name="other"
        )
        self.assertIn("'SAMMed3D test volume'", logic.undoRefusal(segmentationNode, segmentId, otherVolume))
        with self.assertRaises(ValueError):
            logic.undo(segmentationNode, segmentId, otherVolume)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), sphere)
        self.assertIsNotNone(logic.undo(segmentationNode, segmentId, volumeNode))
        self.assertEqual(int(self._segmentArray(segmentationNode, segmentId, volumeNode).sum()), 0)

    def test_AVolumeMovedFromItsSegmentationIsNotWrittenAsBefore(self) -> None:
        self.delayDisplay("After a transform moved the volume from its segmentation: no undo, no change-only write")
        volumeNode, sphere, segmentationNode, segmentId = self._sceneWithSphereSegment()
        logic = self.logic
        shift = np.eye(4)
        shift[0, 3] = 10.0
        moved = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        moved.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
        volumeNode.SetAndObserveTransformNodeID(moved.GetID())  # the segmentation stays under the old transform
        self.assertIn("moved relative to the segmentation", logic.undoRefusal(segmentationNode, segmentId, volumeNode))
        with self.assertRaises(ValueError):
            logic.applyResult(self._fakeResult(np.zeros_like(sphere), sphere), segmentationNode, segmentId, volumeNode)
        logic.applyResult(self._fakeResult(sphere, first=True), segmentationNode, segmentId, volumeNode)
        self.assertIsNone(logic.undoRefusal(segmentationNode, segmentId, volumeNode))  # a new session's step

    def test_NewSessionReplacesTheSegment(self) -> None:
        self.delayDisplay("A session's first result replaces the segment whole; undo brings it back")
        volumeNode, sphere, centerWorld = self._createScene()
        logic = self.logic
        segmentationNode, segmentId, slab = self._segmentWithSlab(volumeNode, sphere)
        logic.applyResult(self._fakeResult(sphere, first=True), segmentationNode, segmentId, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), sphere)
        logic.undo(segmentationNode, segmentId, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), slab)

    def test_ExcludePointsAloneKeepTheSegment(self) -> None:
        self.delayDisplay("Exclude points placed first on a segment keep it; the first include point replaces it")
        volumeNode, sphere, centerWorld = self._createScene()
        self._useTestModel()
        logic = self.logic
        segmentationNode, segmentId, slab = self._segmentWithSlab(volumeNode, sphere)
        logic.endSession()
        exclude = ((False, tuple(centerWorld)),)
        alone = logic.requestSegmentation(volumeNode, logic.clicksFromPrompts(volumeNode, exclude)).result()
        logic.applyResult(alone, segmentationNode, segmentId, volumeNode, promptsBefore=(), promptsAfter=exclude)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), slab)

        both = exclude + ((True, tuple(np.asarray(centerWorld) + (4.0, 0.0, 0.0))),)
        result = logic.requestSegmentation(volumeNode, logic.clicksFromPrompts(volumeNode, both)).result()
        self.assertTrue(result.first)
        logic.applyResult(result, segmentationNode, segmentId, volumeNode, promptsBefore=exclude, promptsAfter=both)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), result.mask)

    def test_FailedWriteIsUndoable(self) -> None:
        self.delayDisplay("A write that fails part-way is recorded as far as it got")
        volumeNode, sphere, centerWorld = self._createScene()
        logic = self.logic
        segmentationNode, other, slab = self._segmentWithSlab(volumeNode, sphere)
        target = logic.addSegment(segmentationNode, "target")
        writeSegmentPatch = logic.writeSegmentPatch

        def failingForTarget(node, segmentId, *arguments, **options):
            if segmentId == target:
                raise RuntimeError("simulated failure")
            writeSegmentPatch(node, segmentId, *arguments, **options)

        logic.writeSegmentPatch = failingForTarget
        with self.assertRaises(RuntimeError):
            logic.applyResult(self._fakeResult(sphere), segmentationNode, target, volumeNode, overwriteOthers=True)
        logic.writeSegmentPatch = writeSegmentPatch
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, other, volumeNode), slab & (1 - sphere))
        logic.undo(segmentationNode, target, volumeNode)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, other, volumeNode), slab)

    def test_SegmentFromWorldPoints(self) -> None:
        self.delayDisplay("One call from the console API")
        volumeNode, sphere, centerWorld = self._createScene()
        trained = self._useTestModel()
        fromSelector = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # as the selector adds one
        segmentationNode, segmentId = self.logic.segment(
            volumeNode, [centerWorld], segmentationNode=fromSelector, checkpoint=None, device="cpu"
        )
        self.assertIsNotNone(segmentationNode.GetDisplayNode(), "a segmentation made by the selector is shown")
        result = self.logic.lastResult
        written = self._segmentArray(segmentationNode, segmentId, volumeNode)
        np.testing.assert_array_equal(written, result.mask)
        centerLocal = self.logic.clicksFromPrompts(volumeNode, [(True, tuple(centerWorld))])[0].ras
        self.assertTrue(result.regions[0].contains_index(result.regions[0].ras_to_region_index(centerLocal)))
        if trained:
            dice = 2.0 * np.sum(written & sphere) / max(1, int(written.sum() + sphere.sum()))
            self.assertGreater(dice, 0.5, f"Dice {dice:.2f} of the demo model on a bright sphere")

    def test_MovingAPointChangesTheResult(self) -> None:
        self.delayDisplay("Interactive: move a point, undo")
        volumeNode, sphere, centerWorld = self._createScene()
        trained = self._useTestModel()
        logic = self.logic
        segmentationNode = logic.ensureSegmentation(volumeNode)
        segmentId = logic.addSegment(segmentationNode)
        first = ((True, tuple(centerWorld)),)
        result1 = logic.requestSegmentation(volumeNode, logic.clicksFromPrompts(volumeNode, first)).result()
        logic.applyResult(result1, segmentationNode, segmentId, volumeNode, promptsBefore=(), promptsAfter=first)
        after1 = self._segmentArray(segmentationNode, segmentId, volumeNode)

        moved = ((True, tuple(np.asarray(centerWorld) + (6.0, -4.0, 3.0))),)
        result2 = logic.requestSegmentation(volumeNode, logic.clicksFromPrompts(volumeNode, moved)).result()
        self.assertFalse(
            np.allclose(result1.regions[0].center_ras, result2.regions[0].center_ras),
            "the region follows the first click",
        )
        if trained:
            self.assertFalse(np.array_equal(result1.mask, result2.mask), "moving the point changes the mask")
        logic.applyResult(result2, segmentationNode, segmentId, volumeNode, promptsBefore=first, promptsAfter=moved)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), result2.mask)

        promptNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")  # now placed into
        logic.showRegionBoxes(volumeNode, result2.regions, visible=True)
        self.assertEqual(
            slicer.app.applicationLogic().GetSelectionNode().GetActivePlaceNodeID(),
            promptNode.GetID(),
            "a new region box does not take the clicks meant for prompt points",
        )
        boxes = logic.regionBoxNodes()
        self.assertEqual(len(boxes), len(result2.regions))
        centerWorld = [0.0, 0.0, 0.0]
        boxes[0].GetCenterWorld(centerWorld)
        expected = logic.volumeToWorld(volumeNode, [result2.regions[0].center_ras])[0]
        np.testing.assert_allclose(centerWorld, expected, atol=1e-3)
        np.testing.assert_allclose(boxes[0].GetSize(), result2.regions[0].size_mm, atol=1e-3)

        step = logic.undo(segmentationNode, segmentId, volumeNode)
        self.assertEqual(step.prompts_before, first)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentId, volumeNode), after1)

    def test_BatchOutputsNeverCollideOrPileUp(self) -> None:
        self.delayDisplay("Batch: one file per item, none replaced, volumes loaded from files removed again")
        import shutil
        import tempfile

        volumeNode, sphere, centerWorld = self._createScene()
        self._useTestModel()
        folder = pathlib.Path(tempfile.mkdtemp(prefix="SAMMed3D-batch-"))
        try:
            imageFile = folder / "image.nrrd"
            self.assertTrue(slicer.util.saveNode(volumeNode, str(imageFile)))
            volumesBefore = len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
            local = np.linalg.inv(self._parentToWorld()) @ np.array([*centerWorld, 1.0])  # the file has no transform
            outcomes = self.logic.segmentBatch(
                [volumeNode, volumeNode, imageFile],
                [[centerWorld], [centerWorld], [local[:3]]],
                folder / "out",
                device="cpu",
            )
            self.assertTrue(all(o.ok for o in outcomes), [o.error for o in outcomes])
            self.assertEqual(len({o.outputPath for o in outcomes}), 3)
            self.assertTrue(all(pathlib.Path(o.outputPath).is_file() for o in outcomes))
            self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")), volumesBefore)
            again = self.logic.segmentBatch([volumeNode], [[centerWorld]], folder / "out", device="cpu")
            self.assertIn("already exists", again[0].error)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def test_BatchContinuesPastFailures(self) -> None:
        self.delayDisplay("Batch: a bad item is reported, the others still run")
        volumeNode, sphere, centerWorld = self._createScene()
        self._useTestModel()
        outside = np.asarray(centerWorld) + 1000.0
        outcomes = self.logic.segmentBatch(
            [volumeNode, volumeNode], [[centerWorld], {"positive": [outside]}], checkpoint=None, device="cpu"
        )
        self.assertEqual(len(outcomes), 2)
        self.assertTrue(outcomes[0].ok, outcomes[0].error)
        self.assertIsNotNone(outcomes[0].segmentId)
        self.assertFalse(outcomes[1].ok)
        self.assertIn("outside", outcomes[1].error)
